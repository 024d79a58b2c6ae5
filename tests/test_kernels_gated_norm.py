"""gated_norm's kernel (the mixer's grouped gated RMSNorm writing out_proj's input)
against gated_norm_reference, in the Metal emulator."""

import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.kernels import gated_norm as mod  # noqa: E402
from mlx_falcon_h1.kernels import runtime_check  # noqa: E402
from mlx_falcon_h1.msl_emu.testing import emulated, gradients_through_kernel, refuse_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16


def make_inputs(seed, batch, dim, groups, dtype, gate, out_dtype, prefix=0, prefix_dtype=None):
    sizes = dict(dim=dim, groups=groups, dtype=dtype, gate=gate, out_dtype=out_dtype,
                 prefix=prefix, prefix_dtype=prefix_dtype)
    return runtime_check.check_inputs("gated_norm", sizes, batch=batch, seed=seed)


def check(inp, **options):
    with emulated(mod, **options) as (kernel,):
        out = mod.gated_norm(**inp)
        mx.eval(out)
        assert kernel.last, "the dispatcher did not take the kernel"
    ref = mod.gated_norm_reference(**inp)
    assert out.dtype == ref.dtype == inp["out_dtype"] and out.shape == ref.shape
    n_prefix = 0 if inp["prefix"] is None else inp["prefix"].shape[1]
    # The prefix: one float32 multiply and one rounding on both paths, so exact.
    assert mx.array_equal(out[:, :n_prefix], ref[:, :n_prefix]).item()
    tolerance = mod.KERNEL_OP.tolerance[inp["out_dtype"]]
    rel = runtime_check.relative_error([out[:, n_prefix:]], [ref[:, n_prefix:]])
    assert rel <= tolerance, rel
    return out


# (batch, d, groups, x dtype, gate dtype or None, out dtype, prefix width, prefix dtype)
CASES = {
    "norm_first_f32": (1, 64, 1, F32, F32, F32, 0, None),
    "gate_first_bf16_out": (2, 96, 2, F32, None, BF16, 0, None),
    "norm_first_groups3_f16": (3, 48, 3, F16, F16, F16, 0, None),
    "bf16_gate_f32_x_prefix": (2, 128, 2, F32, BF16, BF16, 40, BF16),
    "gate_first_prefix_f32_batch3": (3, 64, 1, F32, None, F32, 24, F16),
    # 9000 channels: 1024 threads (the cap) stride over them; not a multiple of 32.
    "wide_group_norm_first": (1, 9000, 1, F32, BF16, BF16, 0, None),
    # A prefix wider than the row's G x threads copiers (2 x 32): each copies several.
    "prefix_wider_than_copiers": (2, 64, 2, F32, F32, F32, 300, F32),
    # One channel per group: the norm of a single value.
    "one_channel_groups": (1, 4, 4, F32, F32, F32, 0, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    batch, dim, groups, dtype, gate, out_dtype, prefix, prefix_dtype = CASES[case]
    check(make_inputs(0, batch, dim, groups, dtype, gate, out_dtype, prefix, prefix_dtype),
          layout="padded")


def test_statistics_are_per_group():
    """Scaling one group's input leaves the other group's output alone (a norm over
    all of d would change it) and its own unchanged (the norm is scale-free)."""
    inp = make_inputs(1, 1, 64, 2, F32, F32, F32)
    with emulated(mod, schedules=("forward",)):
        out = mod.gated_norm(**inp)
        scaled = mx.concatenate([inp["x"][:, :32] * 8.0, inp["x"][:, 32:]], axis=1)
        out_scaled = mod.gated_norm(**{**inp, "x": scaled})
    assert mx.allclose(out, out_scaled, rtol=1e-5, atol=1e-6).item()
    whole = mod.gated_norm_reference(**{**inp, "groups": 1})
    assert not mx.allclose(out, whole, rtol=1e-3).item()  # the control: groups matter


def test_every_schedule_agrees():
    """The threads' order through the barrier does not change the result: forward,
    reverse and random schedules, races tracked (a missing barrier shows here)."""
    inp = make_inputs(2, 2, 200, 2, F32, F32, F32, prefix=16, prefix_dtype=F32)
    check(inp, schedules=("forward", "reverse", "random:3"))


def test_reference_path_when_the_kernel_cannot_take_it(monkeypatch):
    """Rows not given as (B, d), or kernels switched off: the reference, and right."""
    refuse_kernel(monkeypatch, mod)  # "Metal here", but the kernel fails if called
    inp = make_inputs(3, 2, 64, 2, F32, F32, F32)
    per_token = dict(inp, x=inp["x"][:, None], gate=inp["gate"][:, None])  # (B, 1, d)
    out = mod.gated_norm(**per_token)
    assert mx.array_equal(out, mod.gated_norm_reference(**per_token)).item()
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    assert mx.array_equal(mod.gated_norm(**inp), mod.gated_norm_reference(**inp)).item()


def test_gradients_are_the_references():
    inp = make_inputs(4, 2, 64, 2, F32, F32, F32, prefix=8, prefix_dtype=F32)
    ours, ref = gradients_through_kernel(mod, "gated_norm", inp, ("x", "gate", "weight", "prefix"),
                                         lambda out: (out * out).sum())
    for a, b in zip(ours, ref):
        assert mx.allclose(a, b, rtol=1e-5, atol=1e-6).item()


def test_bad_prefix_is_refused_by_name():
    inp = make_inputs(5, 2, 64, 1, F32, None, F32)
    with pytest.raises(ValueError, match="gated_norm: prefix has shape"):
        mod.gated_norm(**dict(inp, prefix=mx.zeros((3, 8))))
