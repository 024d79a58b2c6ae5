"""rope_qk's kernel (RoPE of q and k in one dispatch) against rope_qk_reference, in the emulator."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.kernels import rope as mod  # noqa: E402
from mlx_falcon_h1.kernels import runtime_check  # noqa: E402
from mlx_falcon_h1.msl_emu import MSLEmuError  # noqa: E402
from mlx_falcon_h1.msl_emu.testing import emulated, gradients_through_kernel, refuse_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
TOL = {F32: 2e-5, F16: 2e-3, BF16: 1e-2}


def rel_err(ours, ref):
    return float(mx.abs(ours.astype(F32) - ref.astype(F32)).max() / mx.abs(ref.astype(F32)).max())


def make_inputs(seed, batch, heads, kv_heads, head_dim, length, dtype):
    sizes = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=dtype)
    return runtime_check.check_inputs("rope_qk", sizes, batch=batch, length=length, seed=seed)


def as_projected(x):
    """x (B, H, L, D) as the model has it: a transposed view of a (B, L, H*D) projection."""
    b, h, length, d = x.shape
    return mx.contiguous(x.transpose(0, 2, 1, 3)).reshape(b, length, h, d).transpose(0, 2, 1, 3)


def check(inp, **options):
    with emulated(mod, **options) as (kernel,):
        q, k = mod.rope_qk(**inp)
        mx.eval(q, k)
        assert kernel.last, "the dispatcher did not take the kernel"
    q_ref, k_ref = mod.rope_qk_reference(**inp)
    for ours, ref in ((q, q_ref), (k, k_ref)):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert rel_err(ours, ref) <= TOL[ref.dtype], rel_err(ours, ref)
    return q, k


# (batch, q heads, kv heads, head dim, tokens, dtype, offset, layout)
CASES = {
    "decode_f32_array_offsets": (2, 8, 2, 64, 1, F32, None, "padded"),
    "decode_bf16_int_offset": (1, 12, 2, 128, 1, BF16, 5, "contiguous"),
    "prefill_f16_scalar_array_offset": (2, 4, 4, 32, 7, F16, "scalar", "padded"),
    "far_positions_f32": (1, 2, 1, 16, 3, F32, 262_000, "given"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    batch, h, hk, d, length, dtype, offset, layout = CASES[case]
    inp = make_inputs(0, batch, h, hk, d, length, dtype)
    if offset == "scalar":
        inp["offset"] = mx.array(1000, dtype=mx.int32)
    elif offset is not None:
        inp["offset"] = offset
    check(dict(inp, q=as_projected(inp["q"]), k=as_projected(inp["k"])), layout=layout)


def test_scaled_positions():
    inp = make_inputs(1, 1, 2, 2, 16, 2, F32)
    check(dict(inp, scale=0.25), schedules=("forward", "random:2"))


def test_gradients_are_the_references():
    inp = make_inputs(2, 1, 2, 1, 16, 1, F32)
    loss = lambda out: (out[0] * out[0]).sum() + (out[1] * mx.arange(16)).sum()  # noqa: E731
    for g, g_ref in zip(*gradients_through_kernel(mod, "rope_qk", inp, ["q", "k"], loss)):
        assert mx.allclose(g, g_ref, rtol=1e-5, atol=1e-5).item()


def test_dispatcher_takes_the_reference_outside_the_kernel(monkeypatch):
    refuse_kernel(monkeypatch, mod)
    ok = make_inputs(3, 1, 2, 2, 16, 1, F32)
    unfit = {
        "k_dtype_differs": {**ok, "k": ok["k"].astype(F16)},
        "odd_head_dim": make_inputs(3, 1, 2, 2, 15, 1, F32) | {"freqs": mx.ones((7,))},
        "partial_rotation": {**ok, "freqs": ok["freqs"][:4]},
        "float_offsets": {**ok, "offset": mx.array([3.0])},
        "offsets_per_token": {**ok, "offset": mx.array([[1, 2]])},
    }
    for name, inp in unfit.items():
        try:
            mod.rope_qk(**inp)
        except AssertionError:
            raise AssertionError(f"{name}: the kernel was called") from None
        except ValueError:
            pass  # the reference's own error for arguments mx.fast.rope refuses
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    mod.rope_qk(**ok)


def test_reference_matches_the_rotation_formula():
    """The oracle itself, in float64 numpy: theta = scale * position / freq."""
    inp = make_inputs(4, 2, 2, 1, 8, 3, F32)
    q_ref, k_ref = mod.rope_qk_reference(**inp)
    freqs = np.array(inp["freqs"], dtype=np.float64)
    for x, ref in ((inp["q"], q_ref), (inp["k"], k_ref)):
        x = np.array(x, dtype=np.float64)
        pos = np.array(inp["offset"])[:, None, None, None] + np.arange(3)[None, None, :, None]
        theta = pos / freqs
        x1, x2 = x[..., :4], x[..., 4:]
        want = np.concatenate([x1 * np.cos(theta) - x2 * np.sin(theta),
                               x1 * np.sin(theta) + x2 * np.cos(theta)], axis=-1)
        assert np.abs(np.array(ref) - want).max() <= 1e-4 * np.abs(want).max()


def test_bug_keys_rotated_at_the_wrong_position_is_caught():
    old = "static_cast<float>(offset[b * offset_strides[0]] + t)"
    assert mod._SOURCE.count(old) == 1
    kernel = msl_emu.metal_kernel(**{**mod.KERNEL_SPEC, "source": mod._SOURCE.replace(
        old, "static_cast<float>(offset[0] + t)")}, schedules=("forward",))
    inp = make_inputs(5, 2, 2, 2, 16, 1, F32)
    with emulated(mod):
        mod._KERNEL = kernel
        q, _ = mod.rope_qk(**inp)
    q_ref, _ = mod.rope_qk_reference(**inp)
    assert rel_err(q, q_ref) > 1e-2  # batch row 1 used row 0's position


def test_bug_write_past_the_output():
    old = "k_out[at + i + half]"
    kernel = msl_emu.metal_kernel(**{**mod.KERNEL_SPEC, "source": mod._SOURCE.replace(
        old, "k_out[at + i + half + 1]")}, schedules=("forward",))
    inp = make_inputs(6, 1, 2, 2, 16, 1, F32)
    with pytest.raises(MSLEmuError, match="out-of-bounds|race"):
        mod._launch(kernel, inp["q"], inp["k"], mx.broadcast_to(inp["offset"], (1,)),
                    inp["freqs"], 1.0)


def test_kernel_source_is_lint_clean():
    assert msl_emu.lint(mod._SOURCE, mod.KERNEL_SPEC.get("header", "")) == []
