"""residual_rms_norm's kernel (residual add + RMSNorm in one dispatch) against its reference."""

import itertools

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.kernels import metal_available, runtime_check  # noqa: E402
from mlx_falcon_h1.kernels import residual_norm as mod  # noqa: E402
from mlx_falcon_h1.msl_emu import MSLEmuError  # noqa: E402
from mlx_falcon_h1.msl_emu.testing import emulated, gradients_through_kernel, refuse_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
TOL = {F32: 2e-5, F16: 2e-3, BF16: 1e-2}  # x max |reference|: the module's arithmetic


def rel_err(ours, ref):
    return float(mx.abs(ours.astype(F32) - ref.astype(F32)).max() / mx.abs(ref.astype(F32)).max())


def sizes_of(dim, dtype, delta, wdtype, out_dtype):
    return dict(dim=dim, dtype=dtype, delta=delta, wdtype=wdtype, out_dtype=out_dtype)


def make_inputs(seed, batch, length, **sizes):
    return runtime_check.check_inputs("residual_rms_norm", sizes, batch=batch, length=length,
                                      seed=seed)


def bound(inp):
    """The tolerance of the coarsest dtype s or n is rounded to (the module's rule, restated)."""
    s_dtype = inp["h"].dtype if inp["delta"] is None else mx.result_type(inp["h"], inp["delta"])
    return max(TOL[s_dtype], TOL[inp["out_dtype"]])


def check(inp, **options):
    """The dispatcher through the emulated kernel vs the reference: s exactly, n within
    its bound; returns n's relative error."""
    with emulated(mod, **options) as (kernel,):
        s, n = mod.residual_rms_norm(**inp)
        mx.eval(s, n)
        assert kernel.last, "the dispatcher did not take the kernel"
    s_ref, n_ref = mod.residual_rms_norm_reference(**inp)
    assert (s.dtype, s.shape, n.dtype, n.shape) == (s_ref.dtype, s_ref.shape, n_ref.dtype,
                                                    n_ref.shape)
    assert n.dtype == inp["out_dtype"]
    if inp["delta"] is None:
        assert s is inp["h"]  # the norm alone: s is h, not a copy
    # The sum is one rounding of a float32 add in both: bit for bit.
    assert mx.array_equal(s, s_ref).item()
    err = rel_err(n, n_ref)
    assert err <= bound(inp), err
    return err


DTYPES = (F32, F16, BF16)


@pytest.mark.parametrize("dtype,wdtype,out_dtype,residual", list(itertools.product(
    DTYPES, (F32, BF16), (F32, BF16), (True, False))))
def test_kernel_matches_reference(dtype, wdtype, out_dtype, residual):
    # (B, L, D): a decode row at the smallest simdgroup count, and a batch of
    # rows whose D is not a multiple of the threadgroup (1000 over 256 threads).
    for seed, (batch, length, dim) in enumerate([(1, 1, 64), (2, 3, 1000)]):
        inp = make_inputs(seed, batch, length, **sizes_of(
            dim, dtype, dtype if residual else None, wdtype, out_dtype))
        check(inp)


@pytest.mark.parametrize("dtype,delta_dtype", [(BF16, F32), (F32, BF16), (F16, BF16), (BF16, F16)])
def test_mixed_input_dtypes_sum_in_the_promoted_dtype(dtype, delta_dtype):
    inp = make_inputs(1, 2, 2, **sizes_of(320, dtype, delta_dtype, BF16, BF16))
    check(inp, schedules=("forward", "random:2"))


@pytest.mark.parametrize("dim", [8192, 8200])
def test_widest_rows(dim):
    """The 1024-thread cap: 8 elements a thread at 8192, a ragged 9th past it."""
    for dtype in (F32, BF16):
        inp = make_inputs(2, 1, 2, **sizes_of(dim, dtype, dtype, F32, dtype))
        check(inp, schedules=("forward",))


def test_float32_error_is_well_inside_its_tolerance():
    """The tolerance's float32 part is r's summation order: at D = 8192 the error
    is far below it (a kernel summing the wrong elements would not be)."""
    inp = make_inputs(3, 1, 4, **sizes_of(8192, F32, F32, F32, F32))
    assert check(inp, schedules=("forward",)) <= TOL[F32] / 4


def differing(n, n_ref) -> float:
    """The fraction of n's elements that are not the reference's bit for bit."""
    return (n != n_ref).astype(F32).mean().item()


ROUNDED_TWICE = [(BF16, BF16, BF16), (BF16, BF16, F32), (F16, F16, F16)]  # (h, weight, n) dtypes


@pytest.mark.parametrize("dtype,wdtype,out_dtype", ROUNDED_TWICE)
def test_n_takes_the_references_roundings(dtype, wdtype, out_dtype):
    """Where s and the weight are both 16-bit, mx.fast.rms_norm rounds x r and its
    product with the weight to that dtype. The kernel does too, so n is the
    reference's except where r's float32 difference straddles a rounding
    boundary (measured: at most 0.5% of the elements; one rounding fewer: ~25%)."""
    inp = make_inputs(12, 2, 2, **sizes_of(3072, dtype, dtype, wdtype, out_dtype))
    with emulated(mod, schedules=("forward",)):
        _, n = mod.residual_rms_norm(**inp)
    assert differing(n, mod.residual_rms_norm_reference(**inp)[1]) <= 0.02


def test_tolerance_follows_the_coarsest_rounding():
    op = mod.KERNEL_OP
    assert op.tolerance_at(sizes_of(64, F32, F32, F32, F32)) == TOL[F32]
    assert op.tolerance_at(sizes_of(64, F32, F32, F32, BF16)) == TOL[BF16]  # n in bfloat16
    assert op.tolerance_at(sizes_of(64, BF16, F32, BF16, F32)) == TOL[F32]  # s in float32
    assert op.tolerance_at(sizes_of(64, F16, None, F32, F16)) == TOL[F16]
    assert runtime_check.describe(op, sizes_of(3072, BF16, BF16, F32, BF16)) == \
        "residual_rms_norm D3072 bfloat16+bfloat16/float32 out=bfloat16"
    assert runtime_check.describe(op, sizes_of(3072, BF16, None, F32, F32)) == \
        "residual_rms_norm D3072 bfloat16/float32 out=float32"


def test_gradients_are_the_references():
    inp = make_inputs(4, 1, 2, **sizes_of(40, F32, F32, F32, F32))
    weights = mx.arange(40, dtype=F32) / 40
    loss = lambda out: (out[0] * weights).sum() + (out[1] * out[1] * weights).sum()  # noqa: E731
    for keys in (["h", "delta", "weight"], ["h", "weight"]):
        case = inp if "delta" in keys else dict(inp, delta=None)
        got, want = gradients_through_kernel(mod, "residual_rms_norm", case, keys, loss)
        for g, g_ref in zip(got, want):
            assert mx.allclose(g, g_ref, rtol=1e-5, atol=1e-5).item()


@pytest.mark.skipif(metal_available(), reason="checks the path taken without Metal")
def test_dispatcher_takes_the_reference_off_a_mac():
    assert mod._KERNEL is None
    inp = make_inputs(5, 2, 3, **sizes_of(96, BF16, BF16, F32, BF16))
    s, n = mod.residual_rms_norm(**inp)
    s_ref, n_ref = mod.residual_rms_norm_reference(**inp)
    assert mx.array_equal(s, s_ref).item() and mx.array_equal(n, n_ref).item()
    with pytest.raises(RuntimeError, match="needs Metal"):
        mod.residual_rms_norm_kernel(**inp)


def test_dispatcher_takes_the_reference_outside_the_kernel(monkeypatch):
    refuse_kernel(monkeypatch, mod)
    ok = make_inputs(6, 1, 2, **sizes_of(32, F32, F32, F32, F32))
    unfit = {
        "no_weight": {**ok, "weight": None},
        "empty_rows": {**ok, "h": ok["h"][:, :0], "delta": ok["delta"][:, :0]},
        "integer_output": {**ok, "out_dtype": mx.int32},
        "weight_of_another_width": {**ok, "weight": ok["weight"][:16]},
        "delta_of_another_shape": {**ok, "delta": ok["delta"][:, :1]},
    }
    for name, inp in unfit.items():
        try:
            mod.residual_rms_norm(**inp)
        except AssertionError:
            raise AssertionError(f"{name}: the kernel was called") from None
        except ValueError:
            pass  # the reference's own error for arguments it refuses
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    mod.residual_rms_norm(**ok)


def test_delta_of_another_shape_is_refused_by_name():
    inp = make_inputs(7, 1, 2, **sizes_of(32, F32, F32, F32, F32))
    with pytest.raises(ValueError, match="delta's shape"):
        mod.residual_rms_norm_reference(**dict(inp, delta=inp["delta"][:, :1]))


def test_reference_matches_the_formula():
    """The oracle itself, in float64 numpy: s = h + delta, n = w s / sqrt(mean(s^2) + eps)."""
    inp = make_inputs(8, 2, 3, **sizes_of(48, F32, F32, F32, F32))
    s_ref, n_ref = mod.residual_rms_norm_reference(**inp)
    s = np.array(inp["h"], dtype=np.float64) + np.array(inp["delta"], dtype=np.float64)
    want = s / np.sqrt((s * s).mean(-1, keepdims=True) + inp["eps"]) * np.array(inp["weight"])
    assert np.abs(np.array(s_ref) - s).max() <= 1e-6 * np.abs(s).max()
    assert np.abs(np.array(n_ref) - want).max() <= 1e-5 * np.abs(want).max()


def planted(old, new, schedules=("forward",)):
    assert mod._SOURCE.count(old) == 1, old
    return msl_emu.metal_kernel(**{**mod.KERNEL_SPEC, "source": mod._SOURCE.replace(old, new)},
                                schedules=schedules)


def test_bug_norm_of_the_first_simdgroup_only_is_caught():
    kernel = planted("g < (threads + 31) / 32", "g < 1")
    inp = make_inputs(9, 1, 2, **sizes_of(1000, F32, F32, F32, F32))
    with emulated(mod):
        mod._KERNEL = kernel
        s, n = mod.residual_rms_norm(**inp)
    s_ref, n_ref = mod.residual_rms_norm_reference(**inp)
    assert mx.array_equal(s, s_ref).item()
    assert rel_err(n, n_ref) > 0.5  # r from 32 of 1000 squares: n ~2.5x too large


def test_bug_weight_product_without_the_references_rounding_is_caught():
    """Within the bfloat16 tolerance (one ulp), but not the reference's roundings."""
    kernel = planted("const N xr = static_cast<N>(static_cast<float>(s) * r);",
                     "const float xr = static_cast<float>(s) * r;")
    inp = make_inputs(12, 2, 2, **sizes_of(3072, BF16, BF16, BF16, BF16))
    with emulated(mod):
        mod._KERNEL = kernel
        _, n = mod.residual_rms_norm(**inp)
    assert differing(n, mod.residual_rms_norm_reference(**inp)[1]) > 0.1


def test_bug_missing_barrier_is_a_race():
    # Read before another simdgroup's write: the thread schedules disagree.
    kernel = planted("threadgroup_barrier(mem_flags::mem_threadgroup);", "",
                     schedules=("forward", "reverse", "random:1"))
    inp = make_inputs(10, 1, 1, **sizes_of(256, F32, F32, F32, F32))
    with pytest.raises(MSLEmuError, match="depends on thread scheduling"):
        mod._launch(kernel, inp["h"], inp["delta"], inp["weight"], 1e-5, F32)


def test_bug_write_past_the_row():
    kernel = planted("n_out[row + i]", "n_out[row + i + 1]")
    inp = make_inputs(11, 1, 1, **sizes_of(64, F32, F32, F32, F32))
    with pytest.raises(MSLEmuError, match="out-of-bounds|race"):
        mod._launch(kernel, inp["h"], inp["delta"], inp["weight"], 1e-5, F32)


def test_kernel_source_is_lint_clean():
    assert msl_emu.lint(mod._SOURCE, mod.KERNEL_SPEC.get("header", "")) == []
