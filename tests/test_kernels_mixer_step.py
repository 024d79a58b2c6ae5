"""mixer_step's fused decode kernel against mixer_step_reference, in the Metal emulator."""

import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.kernels import mixer_step as mod  # noqa: E402
from mlx_falcon_h1.kernels import gated_norm, runtime_check, ssm_step  # noqa: E402
from mlx_falcon_h1.msl_emu import MSLEmuError  # noqa: E402
from mlx_falcon_h1.msl_emu.testing import emulated, gradients_through_kernel, refuse_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
TOL = {F32: 2e-5, F16: 2e-3, BF16: 1e-2}  # x max |reference|, as ssm_step's


def rel_err(ours, ref):
    return float(mx.abs(ours.astype(F32) - ref.astype(F32)).max() / mx.abs(ref.astype(F32)).max())


def make_inputs(seed, batch, heads, head_dim, groups, n, width, dtype, wdtype, norm,
                out_dtype=None, limit=(0.0, math.inf), with_bias=True, prefix=0, **prefix_sizes):
    """prefix: its width (0: none); prefix_sizes: prefix_dtype, prefix_scale, out_scale."""
    sizes = dict(heads=heads, head_dim=head_dim, groups=groups, n=n, width=width, dtype=dtype,
                 wdtype=wdtype, norm=norm, out_dtype=out_dtype or dtype, prefix=prefix,
                 **prefix_sizes)
    inp = runtime_check.check_inputs("mixer_step", sizes, batch=batch, seed=seed)
    return dict(inp, time_step_limit=limit, conv_bias=inp["conv_bias"] if with_bias else None)


def check(inp, **options):
    """The dispatcher on the emulated kernels (mixer_step's, and gated_norm's after it
    for a mixer with the norm), against the reference."""
    with emulated(mod, gated_norm, **options) as (kernel, norm_kernel):
        out, conv_state, state = mod.mixer_step(**inp)
        mx.eval(out, conv_state, state)
        assert kernel.last, "the dispatcher did not take the kernel"
        assert bool(norm_kernel.last) == (inp["norm_weight"] is not None), "the norm's kernel"
    out_ref, conv_ref, state_ref = mod.mixer_step_reference(**inp)
    assert (out.dtype, conv_state.dtype, state.dtype) == (out_ref.dtype, conv_ref.dtype, state_ref.dtype)
    assert out.shape == out_ref.shape and state.shape == state_ref.shape
    assert out.dtype == inp["out_dtype"]
    tol = TOL[inp["xBC"].dtype]
    n_prefix = 0 if inp.get("prefix") is None else inp["prefix"].shape[1]
    # The prefix: one float32 multiply and one rounding on both paths, so exact.
    assert mx.array_equal(out[:, :n_prefix], out_ref[:, :n_prefix]).item()
    # The mixer's output on its own scale (a relative error over all outputs would let
    # the prefix's or the state's larger values hide an error in it), then the state.
    mixed, mixed_ref = out[:, n_prefix:], out_ref[:, n_prefix:]
    assert rel_err(mixed, mixed_ref) <= max(tol, TOL[out.dtype]), rel_err(mixed, mixed_ref)
    assert rel_err(state, state_ref) <= tol, rel_err(state, state_ref)
    assert mx.array_equal(conv_state, conv_ref).item()  # data movement: exact
    return out, conv_state, state


# (batch, heads, head_dim, groups, n, width, dtype, param dtype, norm, out dtype, layout)
CASES = {
    "no_norm_f32": (1, 2, 32, 1, 16, 4, F32, F32, "none", F32, "padded"),
    "no_norm_bf16_out_bf16": (2, 4, 64, 2, 64, 4, BF16, F32, "none", BF16, "contiguous"),
    "gate_first_groups3": (3, 6, 16, 3, 8, 4, BF16, BF16, "gate_first", BF16, "contiguous"),
    "norm_first_groups2_f16": (2, 4, 32, 2, 32, 4, F16, F16, "norm_first", F16, "padded"),
    "norm_first_n256_p128": (1, 2, 128, 1, 256, 4, F32, F32, "norm_first", F32, "padded"),
    "gate_first_p40_width3_f32_out": (1, 2, 40, 2, 32, 3, F16, F32, "gate_first", F32, "padded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    *dims, norm, out_dtype, layout = CASES[case]
    check(make_inputs(0, *dims, norm, out_dtype), layout=layout)


# (batch, heads, head_dim, groups, n, width, dtype, norm, prefix width, prefix dtype, scales)
PREFIX_CASES = {
    "no_norm_f32_batch3_scaled": (3, 2, 32, 1, 16, 4, F32, "none", 48, F32, (0.375, 2.5)),
    "no_norm_bf16_unit_scales": (1, 4, 16, 2, 32, 4, BF16, "none", 40, BF16, (1.0, 1.0)),
    "no_norm_f16_prefix_bf16": (3, 2, 16, 1, 8, 3, F16, "none", 72, BF16, (0.625, 1.75)),
    "gate_first_f16_batch3": (3, 4, 16, 2, 16, 4, F16, "gate_first", 24, F16, (0.5, 3.0)),
    "gate_first_bf16_unit_scales": (1, 2, 32, 1, 16, 4, BF16, "gate_first", 64, BF16, (1.0, 1.0)),
    "norm_first_f32_batch1": (1, 2, 16, 2, 8, 4, F32, "norm_first", 32, F32, (1.5, 0.25)),
    "norm_first_bf16_batch3": (3, 6, 16, 3, 8, 4, BF16, "norm_first", 20, F32, (0.75, 1.25)),
}


@pytest.mark.parametrize("case", list(PREFIX_CASES))
def test_prefix_and_scales_match_the_reference(case):
    """out = [prefix * prefix_scale | mixer * out_scale], the prefix a transposed
    view read through padded strides."""
    *dims, dtype, norm, n_prefix, prefix_dtype, (prefix_scale, out_scale) = PREFIX_CASES[case]
    inp = make_inputs(7, *dims, dtype, F32, norm, prefix=n_prefix, prefix_dtype=prefix_dtype,
                      prefix_scale=prefix_scale, out_scale=out_scale)
    assert inp["prefix"].shape == (dims[0], n_prefix) and inp["prefix"].dtype == prefix_dtype
    out, *_ = check(inp, layout="padded")
    assert out.shape == (dims[0], n_prefix + dims[1] * dims[2])
    # The prefix columns on their own (numpy): the scaled prefix, rounded once.
    expected = (inp["prefix"].astype(F32) * prefix_scale).astype(dtype)
    assert mx.array_equal(out[:, :n_prefix], expected).item()


def test_prefix_view_of_attentions_output():
    """The prefix as the model has it: attention's (B, Hq, 1, Dh) output, transposed
    and reshaped, in bfloat16, and a column slice of a wider array (row stride != width)."""
    inp = make_inputs(8, 3, 2, 16, 1, 8, 4, BF16, BF16, "none", prefix=0, out_scale=0.5)
    heads_q, head_dim_q = 3, 8
    attn = mx.random.normal((3, heads_q, 1, head_dim_q), key=mx.random.key(8)).astype(BF16)
    views = {"transposed": attn.transpose(0, 2, 1, 3).reshape(3, heads_q * head_dim_q),
             "column_slice": mx.random.normal((3, 40), key=mx.random.key(9)).astype(BF16)[:, 5:29]}
    for name, prefix in views.items():
        for layout in ("given", "padded"):
            check({**inp, "prefix": prefix, "prefix_scale": 1.25}, layout=layout,
                  schedules=("forward",))


def test_prefix_wider_than_the_copying_threads():
    """31*H*P = 248 copying lanes per batch row here: each copies three or four columns."""
    inp = make_inputs(9, 2, 1, 8, 1, 8, 4, F32, F32, "none", prefix=900)
    check(inp, schedules=("forward", "reverse"))


def test_prefix_without_the_norm_is_one_dispatch(monkeypatch):
    """No MLX concatenate or scaling after the kernel: its output is out_proj's input."""
    inp = make_inputs(10, 2, 2, 16, 1, 8, 4, BF16, F32, "none", prefix=32)
    ref = mod.mixer_step_reference(**inp)

    def refuse(*args):
        raise AssertionError("the prefix was joined in MLX")

    monkeypatch.setattr(mod, "with_prefix", refuse)
    with emulated(mod, schedules=("forward",)) as (kernel,):
        out = mod.mixer_step(**inp)
        mx.eval(out)
        assert kernel.last
    assert out[0].shape == (2, 32 + 32)
    assert mx.array_equal(out[0][:, :32], ref[0][:, :32]).item()
    assert rel_err(out[0][:, 32:], ref[0][:, 32:]) <= TOL[BF16]


def test_bad_prefix_is_refused_by_name():
    inp = make_inputs(11, 2, 2, 16, 1, 8, 4, F32, F32, "none")
    bad = {"wrong_batch": mx.zeros((3, 8)), "empty": mx.zeros((2, 0)), "one_axis": mx.zeros((16,)),
           "integer": mx.zeros((2, 8), dtype=mx.int32)}
    for name, prefix in bad.items():
        for fn in (mod.mixer_step, mod.mixer_step_reference):
            with pytest.raises(ValueError, match="prefix has shape"):
                fn(**{**inp, "prefix": prefix})


def test_clipped_dt_and_no_conv_bias():
    check(make_inputs(1, 2, 2, 32, 1, 16, 4, F32, F32, "none", limit=(0.01, 0.5),
                      with_bias=False), schedules=("forward", "random:3"))


def test_steps_continue_like_the_reference():
    inp = make_inputs(2, 2, 2, 32, 2, 16, 4, F32, F32, "gate_first")
    rng = np.random.default_rng(2)
    ours = ref = (inp["conv_state"], inp["state"])
    for _ in range(3):
        token = mx.array(rng.standard_normal(inp["xBC"].shape).astype(np.float32))
        step = {**inp, "xBC": token}
        _, *ours = check({**step, "conv_state": ours[0], "state": ours[1]}, schedules=("forward",))
        _, *ref = mod.mixer_step_reference(**{**step, "conv_state": ref[0], "state": ref[1]})
    assert mx.array_equal(ours[0], ref[0]).item()
    assert rel_err(ours[1], ref[1]) <= 2e-5


def test_reference_is_ssm_step_then_the_gate():
    """The reference's output is ssm_step's y gated (or normed), on any backend."""
    inp = make_inputs(3, 2, 2, 16, 1, 8, 4, F32, F32, "none")
    y, conv, state = ssm_step.ssm_step_reference(
        *[inp[k] for k in ("xBC", "dt", "conv_state", "conv_weight", "conv_bias", "dt_bias",
                           "A_log", "D", "state", "time_step_limit", "n_groups")])
    z = inp["z"].astype(F32)
    out, conv_ref, state_ref = mod.mixer_step_reference(**inp)
    expected = y.reshape(2, -1) * z * mx.sigmoid(z)
    assert mx.allclose(out, expected, rtol=1e-6, atol=1e-6).item()
    assert mx.array_equal(conv, conv_ref).item() and mx.array_equal(state, state_ref).item()


def test_gradients_are_the_references():
    inp = make_inputs(4, 1, 2, 16, 1, 8, 4, F32, F32, "norm_first")
    keys = ["xBC", "dt", "z", "conv_state", "state", "norm_weight"]
    loss = lambda out: (out[0] * out[0]).sum() + out[2].sum()  # noqa: E731
    for g, g_ref in zip(*gradients_through_kernel(mod, "mixer_step", inp, keys, loss)):
        assert mx.allclose(g, g_ref, rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("norm", ["none", "norm_first"])
def test_gradients_through_the_prefix_are_the_references(norm):
    inp = make_inputs(13, 2, 2, 16, 1, 8, 4, F32, F32, norm, prefix=24)
    keys = ["xBC", "z", "state", "prefix"]
    loss = lambda out: (out[0] * out[0]).sum() + out[2].sum()  # noqa: E731
    for g, g_ref in zip(*gradients_through_kernel(mod, "mixer_step", inp, keys, loss)):
        assert mx.allclose(g, g_ref, rtol=1e-5, atol=1e-5).item()


@pytest.mark.parametrize("norm", ["none", "gate_first"])
def test_out_scale_without_a_prefix(norm):
    inp = make_inputs(14, 3, 2, 16, 1, 8, 4, BF16, F32, norm, out_scale=2.75)
    assert inp["prefix"] is None
    out, *_ = check(inp, schedules=("forward",))
    unscaled = mod.mixer_step_reference(**{**inp, "out_scale": 1.0})[0].astype(F32)
    assert out.shape == unscaled.shape and rel_err(out, unscaled * 2.75) <= TOL[BF16]


def test_dispatcher_takes_the_reference_outside_the_kernel(monkeypatch):
    refuse_kernel(monkeypatch, mod)
    ok = make_inputs(5, 1, 2, 16, 1, 16, 4, F32, F32, "none")
    unfit = {
        "state_over_256": make_inputs(5, 1, 1, 8, 1, 264, 4, F32, F32, "none"),
        "z_dtype_differs": {**ok, "z": ok["z"].astype(F16)},
        "z_wrong_width": {**ok, "z": ok["z"][:, :-1]},
        "norm_weight_wrong_size": {**ok, "norm_weight": mx.ones((7,))},
        "integer_out_dtype": {**ok, "out_dtype": mx.int32},
        "width_9": make_inputs(5, 1, 2, 16, 1, 16, 9, F32, F32, "none"),
        "prefix_integer": {**ok, "prefix": mx.zeros((1, 8), dtype=mx.int32)},
        "prefix_wrong_batch": {**ok, "prefix": mx.zeros((2, 8))},
        "prefix_empty": {**ok, "prefix": mx.zeros((1, 0))},
    }
    for name, inp in unfit.items():
        try:
            mod.mixer_step(**inp)  # no AssertionError: the reference ran
        except AssertionError:
            raise AssertionError(f"{name}: the kernel was called") from None
        except ValueError:
            pass  # the reference's own shape error (norm weight, z): not the kernel's business
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    mod.mixer_step(**ok)


def test_bad_norm_name_is_refused():
    with pytest.raises(ValueError, match="norm 'pre'"):
        runtime_check.check_inputs("mixer_step", dict(heads=2, head_dim=8, groups=1, n=8, width=4,
                                                      dtype=F32, norm="pre"))


def run_mutant(old, new, inp=None, **options):
    assert mod._SOURCE.count(old) == 1, old
    kernel = msl_emu.metal_kernel(**{**mod.KERNEL_SPEC, "source": mod._SOURCE.replace(old, new)},
                                  schedules=("forward",), **options)
    inp = inp or make_inputs(6, 2, 4, 32, 2, 32, 4, F32, F32, "none")
    with emulated(mod, schedules=("forward",)):
        mod._KERNEL = kernel
        return mod.mixer_step(**inp), mod.mixer_step_reference(**inp)


def test_bug_gate_reads_the_wrong_batch_row_is_caught():
    (out, *_), (ref, *_) = run_mutant("z[b * z_strides[0]", "z[0 * z_strides[0]")
    assert rel_err(out, ref) > 1e-2  # the comparison the tests make would fail


def test_bug_output_written_out_of_range():
    with pytest.raises(MSLEmuError, match="out-of-bounds|race"):
        run_mutant("out_row = int64_t(b) *", "out_row = int64_t(b + 1) *")


# A prefix wider than the 31*H*P = 248 copying lanes, batch 2, scales not 1.
PREFIX_MUTANT_INPUTS = dict(seed=12, batch=2, heads=1, head_dim=8, groups=1, n=8, width=4,
                            dtype=F32, wdtype=F32, norm="none", prefix=600)
PREFIX_BUGS = {
    "prefix_of_the_wrong_batch_row": ("prefix[b * prefix_strides[0]", "prefix[0 * prefix_strides[0]"),
    "prefix_scale_left_out": ("v * prefix_scale", "v"),
    "out_scale_left_out": ("static_cast<O>(gated * out_scale)", "static_cast<O>(gated)"),
    "copy_misses_every_other_stride": ("i += copiers", "i += 2 * copiers"),
    "copy_starts_one_column_late": ("* 31 + lane - 1;", "* 31 + lane;"),
    "prefix_column_stride_ignored": ("i * prefix_strides[1]", "i"),
}


@pytest.mark.parametrize("bug", list(PREFIX_BUGS))
def test_planted_prefix_bugs_are_caught(bug):
    inp = make_inputs(**PREFIX_MUTANT_INPUTS)
    assert inp["prefix_scale"] != 1.0 and inp["out_scale"] != 1.0
    (out, *_), _ = run_mutant(*PREFIX_BUGS[bug], inp=inp)
    # check()'s comparisons, one of which must fail.
    n_prefix, (ref, *_) = 600, mod.mixer_step_reference(**inp)
    prefix_exact = mx.array_equal(out[:, :n_prefix], ref[:, :n_prefix]).item()
    mixed_err = rel_err(out[:, n_prefix:], ref[:, n_prefix:])
    assert not (prefix_exact and mixed_err <= TOL[F32]), (prefix_exact, mixed_err)


def test_kernel_source_is_lint_clean():
    assert msl_emu.lint(mod._SOURCE, mod.KERNEL_SPEC["header"]) == []


@pytest.mark.parametrize("norm", ["none", "gate_first", "norm_first"])
def test_model_decode_through_the_kernels_matches_the_reference_path(norm, tmp_path, monkeypatch):
    """The model's decode (model.py's calls: mixer_step, and rope_qk) with every kernel
    emulated, against the same model with the kernels off: float32 logits within 2e-6."""
    from conftest import make_checkpoint

    from mlx_falcon_h1 import load_model
    from mlx_falcon_h1.kernels import conv1d, rope, ssd_scan

    # Emulated kernels are Python callables: they cannot run inside mx.compile's trace.
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "0")
    make_checkpoint(tmp_path, mamba_n_groups=2, mamba_rms_norm=norm != "none",
                    mamba_norm_before_gate=norm == "norm_first")
    model = load_model(tmp_path)[0]
    ids = np.random.default_rng(7).integers(0, 96, size=(2, 12))

    def run():
        cache = model.make_cache()
        pieces = [model(mx.array(ids[:, :9]), cache=cache)]
        pieces += [model(mx.array(ids[:, t:t + 1]), cache=cache) for t in range(9, 12)]
        return np.array(mx.concatenate(pieces, axis=1))

    with emulated(conv1d, ssd_scan, mod, rope, schedules=("forward",)) as kernels:
        ours = run()
        assert kernels[2].last and kernels[3].last, "the decode did not take the fused kernels"
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    ref = run()
    # The bar is 1e-5; measured ~3e-7. Bound at 2e-6: in this small model the
    # mixer's share of the logits is small, and the gate's output 0.1% off moves them 9e-6.
    assert np.abs(ours - ref).max() <= 2e-6 * np.abs(ref).max()


def test_model_leaves_a_tensor_parallel_norm_to_its_own_path(tmp_path, monkeypatch):
    """A rank's ShardedGatedRMSNorm (parallel.py) all-reduces its statistics: the
    decode must call it, not mixer_step's local norm."""
    from conftest import make_checkpoint

    from mlx_falcon_h1 import load_model
    from mlx_falcon_h1 import model as model_module

    make_checkpoint(tmp_path, mamba_rms_norm=True)
    model = load_model(tmp_path)[0]
    calls = []

    import mlx.nn as nn

    class OtherNorm(nn.Module):  # stands in for parallel.ShardedGatedRMSNorm
        def __init__(self, norm):
            super().__init__()
            self.inner = norm

        def __call__(self, y, gate):
            calls.append(y.shape)
            return self.inner(y, gate)

    for layer in model.layers:
        layer.mamba.norm = OtherNorm(layer.mamba.norm)
    monkeypatch.setattr(model_module, "mixer_step", lambda *a: (_ for _ in ()).throw(
        AssertionError("mixer_step called with a rank's norm")))
    cache = model.make_cache()
    model(mx.array([[1, 2, 3]]), cache=cache)
    calls.clear()
    mx.eval(model(mx.array([[4]]), cache=cache))
    assert len(calls) == len(model.layers)
