"""ssd_scan's Metal kernel against ssd_scan_reference, run in the Metal emulator.

Every case goes through the dispatcher (`ssd_scan`) with the module's kernel
swapped for the emulator's, under three thread schedules (each also changes the
simdgroup_matrix layout), with race, bounds and barrier checks on.
"""

import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.kernels import ssd_scan as mod  # noqa: E402
from mlx_falcon_h1.kernels.ssm_step import discretize  # noqa: E402
from mlx_falcon_h1.msl_emu import MSLEmuError  # noqa: E402
from mlx_falcon_h1.msl_emu.testing import (  # noqa: E402
    emulated,
    emulator_kernel,
    gradients_through_kernel,
    refuse_kernel,
)

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
# Outputs are float32 from the same (exactly representable) inputs: only the
# summation order and exp differ. Bound: max |diff| <= TOL x max |reference|.
TOL = 2e-5


def make_inputs(seed, batch, length, heads, head_dim, groups, n, dtype, with_state,
                limit=(0.0, math.inf)):
    rng = np.random.default_rng(seed)

    def normal(*shape, dt=F32):
        return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dt)

    # A = -exp(A_log) from -4.5 to -0.007 and dt from softplus: heads that forget
    # within a token and heads whose state survives many chunks.
    a_log = mx.array(rng.uniform(-5.0, 1.5, heads).astype(np.float32))
    dt, A = discretize(normal(batch, length, heads), normal(heads), a_log, limit)
    return dict(
        x=normal(batch, length, heads, head_dim, dt=dtype), dt=dt, A=A,
        B=normal(batch, length, groups, n, dt=dtype), C=normal(batch, length, groups, n, dt=dtype),
        D=normal(heads), state=normal(batch, heads, head_dim, n) if with_state else None,
    )


def rel_err(ours, ref):
    return float(mx.abs(ours - ref).max() / mx.abs(ref).max())


def check(inp, chunk_size=16, **options):
    with emulated(mod, **options) as (kernel,):
        assert mod._fits_kernel(*[inp[k] for k in ("x", "dt", "A", "B", "C", "D", "state")])
        y, state = mod.ssd_scan(**inp, chunk_size=chunk_size)
        mx.eval(y, state)
        assert kernel.last, "the dispatcher did not take the kernel"
    y_ref, state_ref = mod.ssd_scan_reference(**inp, chunk_size=chunk_size)
    assert y.dtype == state.dtype == mx.float32
    assert y.shape == y_ref.shape and state.shape == state_ref.shape
    assert rel_err(y, y_ref) <= TOL, rel_err(y, y_ref)
    assert rel_err(state, state_ref) <= TOL, rel_err(state, state_ref)
    return y, state


# (batch, length, heads, head_dim, groups, n, dtype, with_state, layout)
CASES = {
    "one_token": (1, 1, 2, 32, 1, 16, F32, True, "contiguous"),
    "odd_length_groups2_batch2": (2, 7, 4, 32, 2, 32, BF16, True, "padded"),
    "two_full_chunks": (2, 64, 2, 64, 1, 64, F16, True, "contiguous"),
    "chunk_plus_remainder_no_state": (1, 45, 2, 128, 1, 128, F32, False, "padded"),
    "n256_remainder_1": (1, 33, 1, 64, 1, 256, BF16, True, "contiguous"),
    "p48_n24_partial_tiles": (2, 32, 4, 48, 2, 24, F32, True, "padded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    *dims, layout = CASES[case]
    check(make_inputs(0, *dims), layout=layout)


def test_more_schedules_and_a_clipped_dt():
    inp = make_inputs(1, 2, 40, 2, 32, 2, 16, F32, True, limit=(0.05, 0.8))
    check(inp, schedules=("forward", "reverse", "random:2", "random:3", "random:4"))


def test_split_calls_continue_the_state():
    inp = make_inputs(2, 1, 50, 2, 32, 1, 32, F32, True)
    y_full, s_full = check(inp)
    first = {k: (v[:, :19] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y1, s1 = check(first)
    second = {k: (v[:, 19:] if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    y2, s2 = check({**second, "state": s1})
    assert rel_err(mx.concatenate([y1, y2], axis=1), y_full) <= TOL
    assert rel_err(s2, s_full) <= TOL


def test_gradients_are_the_references():
    inp = make_inputs(3, 1, 9, 2, 16, 1, 8, F32, True)
    keys = ["x", "dt", "B", "C", "state"]
    loss = lambda out: (out[0] * out[0]).sum() + out[1].sum()  # noqa: E731
    # The cotangents differ by the kernel's rounding (2y), so the bound is the
    # file's: max |diff| <= TOL x max |reference| (elementwise 1e-5 failed on
    # a 1.79 entry of a gradient whose largest entry is 9e3).
    for g, g_ref in zip(*gradients_through_kernel(mod, "ssd_scan", {**inp, "chunk_size": 4}, keys, loss)):
        assert rel_err(g, g_ref) <= TOL, rel_err(g, g_ref)


def test_dispatcher_takes_the_reference_outside_the_kernel(monkeypatch):
    refuse_kernel(monkeypatch, mod)
    ok = make_inputs(4, 1, 5, 2, 16, 1, 16, F32, True)
    unfit = {
        "head_dim_not_multiple_of_8": make_inputs(4, 1, 5, 2, 12, 1, 16, F32, True),
        "state_size_not_multiple_of_8": make_inputs(4, 1, 5, 2, 16, 1, 12, F32, True),
        "state_size_over_256": make_inputs(4, 1, 5, 1, 8, 1, 264, F32, True),
        "mixed_dtypes": {**ok, "B": ok["B"].astype(BF16)},
        "float16_state": {**ok, "state": ok["state"].astype(F16)},
    }
    for name, inp in unfit.items():
        y, _ = mod.ssd_scan(**inp, chunk_size=4)  # no AssertionError: the reference ran
        assert y.shape == inp["x"].shape, name
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    mod.ssd_scan(**ok, chunk_size=4)


# ----------------------------------------------- the emulator catches bugs here
def run_mutant(old, new, match):
    assert mod._SOURCE.count(old) == 1, old
    spec = {**mod.KERNEL_SPEC, "source": mod._SOURCE.replace(old, new)}
    kernel = msl_emu.metal_kernel(**spec)
    inp = make_inputs(5, 1, 40, 1, 32, 1, 16, F32, True)
    with pytest.raises(MSLEmuError, match=match):
        y, s = mod._launch(kernel, *[inp[k] for k in ("x", "dt", "A", "B", "C", "D", "state")])
        y_ref, s_ref = mod.ssd_scan_reference(**inp, chunk_size=16)
        if rel_err(y, y_ref) > TOL or rel_err(s, s_ref) > TOL:  # numerically wrong
            raise MSLEmuError("wrong result")


def test_bug_missing_barrier_after_staging_b_and_c():
    run_mutant("""            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            for (int kk = 0;""", """            }
            for (int kk = 0;""", "scheduling|race")


def test_bug_missing_simdgroup_barrier_before_the_output_copy():
    run_mutant("simdgroup_barrier(mem_flags::mem_threadgroup);", "", "scheduling")


def test_bug_inclusive_instead_of_exclusive_decay_to_end():
    run_mutant("simd_prefix_exclusive_sum(simd_shuffle", "simd_prefix_inclusive_sum(simd_shuffle",
               "wrong result")


def test_bug_upper_triangle_not_masked():
    run_mutant("if (s <= t) {", "if (s <= t + 1) {", "wrong result|race|out-of-bounds")


def test_kernel_source_is_lint_clean():
    assert msl_emu.lint(mod._SOURCE, mod.KERNEL_SPEC["header"]) == []


def test_emulator_kernel_uses_the_modules_spec():
    assert emulator_kernel(mod).source == mod.KERNEL_SPEC["source"]
