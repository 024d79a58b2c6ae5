"""ssm_step's fused decode kernel against ssm_step_reference, in the Metal emulator."""

import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.kernels import ssm_step as mod  # noqa: E402
from mlx_falcon_h1.msl_emu import MSLEmuError  # noqa: E402
from mlx_falcon_h1.msl_emu.testing import emulated, gradients_through_kernel, refuse_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
ARGS = ["xBC", "dt", "conv_state", "conv_weight", "conv_bias", "dt_bias", "A_log", "D", "state",
        "time_step_limit", "n_groups"]
# y and the state are float32. In float32 only summation order and exp/log
# differ; in 16-bit dtypes the conv output is rounded to the dtype before the
# SSM (as in the reference), and a float32 difference can flip that rounding.
TOL = {F32: 2e-5, F16: 2e-3, BF16: 1e-2}  # x max |reference|


def make_inputs(seed, batch, heads, head_dim, groups, n, width, dtype, wdtype, with_bias,
                limit=(0.0, math.inf)):
    rng = np.random.default_rng(seed)

    def normal(*shape, dt=F32, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dt)

    channels = heads * head_dim + 2 * groups * n
    return dict(
        xBC=normal(batch, channels, dt=dtype), dt=normal(batch, heads, dt=dtype),
        conv_state=normal(batch, width - 1, channels, dt=dtype),
        conv_weight=normal(channels, width, dt=wdtype, scale=0.5),
        conv_bias=normal(channels, dt=wdtype) if with_bias else None,
        dt_bias=normal(heads, dt=wdtype),
        # A = -exp(A_log) from -4.5 to -0.007: fast- and slow-forgetting heads
        A_log=mx.array(rng.uniform(-5.0, 1.5, heads).astype(np.float32)).astype(wdtype),
        D=normal(heads, dt=wdtype), state=normal(batch, heads, head_dim, n),
        time_step_limit=limit, n_groups=groups,
    )


def rel_err(ours, ref):
    return float(mx.abs(ours.astype(F32) - ref.astype(F32)).max() / mx.abs(ref.astype(F32)).max())


def check(inp, **options):
    with emulated(mod, **options) as (kernel,):
        assert mod._fits_kernel(*[inp[k] for k in ARGS[:5]], inp["state"], inp["n_groups"])
        y, conv_state, state = mod.ssm_step(**inp)
        mx.eval(y, conv_state, state)
        assert kernel.last, "the dispatcher did not take the kernel"
    y_ref, conv_ref, state_ref = mod.ssm_step_reference(**inp)
    assert (y.dtype, conv_state.dtype, state.dtype) == (y_ref.dtype, conv_ref.dtype, state_ref.dtype)
    assert y.shape == y_ref.shape and state.shape == state_ref.shape
    tol = TOL[inp["xBC"].dtype]
    assert rel_err(y, y_ref) <= tol, rel_err(y, y_ref)
    assert rel_err(state, state_ref) <= tol, rel_err(state, state_ref)
    assert mx.array_equal(conv_state, conv_ref).item()  # data movement: exact
    return y, conv_state, state


# (batch, heads, head_dim, groups, n, width, dtype, param dtype, bias, dt limit, layout)
CASES = {
    "small_f32": (1, 2, 32, 1, 16, 4, F32, F32, True, (0.0, math.inf), "padded"),
    "bf16_groups2_batch2": (2, 4, 64, 2, 64, 4, BF16, F32, True, (0.0, math.inf), "contiguous"),
    "n256_p128_clipped_no_bias": (2, 2, 128, 1, 256, 4, F16, F16, False, (0.01, 0.5), "padded"),
    "tiny_model_shape_groups3": (3, 6, 16, 3, 8, 4, BF16, BF16, True, (0.0, math.inf), "contiguous"),
    "p40_partial_threadgroup_width3": (1, 2, 40, 2, 32, 3, F32, F32, True, (0.0, math.inf), "padded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    *dims, limit, layout = CASES[case]
    check(make_inputs(0, *dims, limit=limit), layout=layout)


def test_mixed_parameter_dtypes_are_widened():
    inp = make_inputs(1, 2, 2, 16, 1, 16, 4, BF16, BF16, True)
    check({**inp, "D": inp["D"].astype(F32)}, schedules=("forward", "random:7"))


def test_steps_continue_like_the_reference():
    inp = make_inputs(2, 2, 2, 32, 2, 16, 4, F32, F32, True)
    rng = np.random.default_rng(2)
    ours = ref = (inp["conv_state"], inp["state"])
    for _ in range(3):
        token = mx.array(rng.standard_normal(inp["xBC"].shape).astype(np.float32))
        step = {**inp, "xBC": token}
        _, *ours = check({**step, "conv_state": ours[0], "state": ours[1]}, schedules=("forward",))
        _, *ref = mod.ssm_step_reference(**{**step, "conv_state": ref[0], "state": ref[1]})
    assert mx.array_equal(ours[0], ref[0]).item()
    assert rel_err(ours[1], ref[1]) <= 2e-5


def test_gradients_are_the_references():
    inp = make_inputs(3, 1, 2, 16, 1, 8, 4, F32, F32, True)
    keys = ["xBC", "dt", "conv_state", "conv_weight", "state"]
    loss = lambda out: (out[0] * out[0]).sum() + out[2].sum()  # noqa: E731
    for g, g_ref in zip(*gradients_through_kernel(mod, "ssm_step", inp, keys, loss)):
        assert mx.allclose(g, g_ref, rtol=1e-5, atol=1e-5).item()


def test_dispatcher_takes_the_reference_outside_the_kernel(monkeypatch):
    refuse_kernel(monkeypatch, mod)
    ok = make_inputs(4, 1, 2, 16, 1, 16, 4, F32, F32, True)
    unfit = {
        "state_over_256": make_inputs(4, 1, 1, 8, 1, 264, 4, F32, F32, True),
        "float16_state": {**ok, "state": ok["state"].astype(F16)},
        "dt_dtype_differs": {**ok, "dt": ok["dt"].astype(F16)},
        "conv_state_dtype_differs": {**ok, "conv_state": ok["conv_state"].astype(BF16)},
        "width_9": make_inputs(4, 1, 2, 16, 1, 16, 9, F32, F32, True),
    }
    for name, inp in unfit.items():
        mod.ssm_step(**inp)  # no AssertionError: the reference ran
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    mod.ssm_step(**ok)


def run_mutant(old, new, match, **options):
    assert mod._SOURCE.count(old) == 1, old
    kernel = msl_emu.metal_kernel(**{**mod.KERNEL_SPEC, "source": mod._SOURCE.replace(old, new)},
                                  **options)
    inp = make_inputs(5, 1, 4, 32, 2, 32, 4, F32, F32, True)
    with pytest.raises(MSLEmuError, match=match):
        mod._launch(kernel, *[inp[k] for k in ARGS])


def test_bug_missing_barrier_after_the_shared_b_and_c():
    run_mutant("    threadgroup_barrier(mem_flags::mem_threadgroup);\n", "", "scheduling|race")


def test_bug_every_head_shifts_the_b_and_c_conv_state():
    run_mutant("const bool shifts_bc = h % heads_per_group == 0 &&", "const bool shifts_bc = true ||",
               "race")


def test_bug_state_row_read_out_of_range():
    # writes into the next row (a race) and, for the last row, past the end
    run_mutant("for (int n = lane; n < N; n += 32)", "for (int n = lane; n <= N; n += 32)",
               "out-of-bounds|race")


def test_kernel_source_is_lint_clean():
    assert msl_emu.lint(mod._SOURCE, mod.KERNEL_SPEC["header"]) == []
