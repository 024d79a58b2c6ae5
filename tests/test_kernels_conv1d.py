"""causal_conv1d's Metal kernel against causal_conv1d_reference, in the Metal emulator."""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.kernels import conv1d as mod  # noqa: E402
from mlx_falcon_h1.msl_emu import MSLEmuError  # noqa: E402
from mlx_falcon_h1.msl_emu.testing import emulated, gradients_through_kernel, refuse_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
# y is rounded to x's dtype from a float32 sum whose order may differ: allow one
# unit in the last place of that dtype (relative), plus float32 noise.
ULP = {F32: 2e-6, F16: 2.0**-10, BF16: 2.0**-7}


def make_inputs(seed, batch, length, channels, width, dtype, wdtype, with_bias, with_state):
    rng = np.random.default_rng(seed)

    def normal(*shape, dt=F32, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dt)

    return dict(
        x=normal(batch, length, channels, dt=dtype),
        weight=normal(channels, width, dt=wdtype, scale=0.5),
        bias=normal(channels, dt=wdtype) if with_bias else None,
        state=normal(batch, width - 1, channels, dt=dtype) if with_state else None,
    )


def check(inp, **options):
    with emulated(mod, **options) as (kernel,):
        assert mod._fits_kernel(**inp)
        y, state = mod.causal_conv1d(**inp)
        mx.eval(y, state)
        assert kernel.last, "the dispatcher did not take the kernel"
    y_ref, state_ref = mod.causal_conv1d_reference(**inp)
    assert y.dtype == y_ref.dtype and state.dtype == state_ref.dtype
    assert y.shape == y_ref.shape and state.shape == state_ref.shape
    tol = ULP[y.dtype]
    diff = mx.abs(y.astype(F32) - y_ref.astype(F32))
    assert mx.all(diff <= tol * mx.abs(y_ref.astype(F32)) + 1e-6).item(), float(diff.max())
    assert mx.array_equal(state, state_ref).item()  # data movement: exact
    return y, state


# (batch, length, channels, width, dtype, weight dtype, bias, state, layout)
CASES = {
    "one_token_with_state": (1, 1, 40, 4, F32, F32, True, True, "padded"),
    "odd_length_bf16_f32_weights": (2, 7, 100, 4, BF16, F32, True, True, "contiguous"),
    "two_blocks_no_bias_no_state_c300": (2, 33, 300, 4, F16, F16, False, False, "padded"),
    "width2_one_block": (1, 16, 64, 2, BF16, BF16, True, False, "contiguous"),
    "shorter_than_window": (3, 2, 24, 4, F32, BF16, True, True, "padded"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    *dims, layout = CASES[case]
    check(make_inputs(0, *dims), layout=layout)


def test_mixed_weight_and_bias_dtypes_are_widened():
    inp = make_inputs(1, 2, 5, 24, 4, BF16, BF16, True, True)
    check({**inp, "bias": inp["bias"].astype(F32)}, schedules=("forward", "random:5"))


def test_split_calls_continue_the_state():
    inp = make_inputs(2, 2, 40, 32, 4, F32, F32, True, True)
    y_full, s_full = check(inp)
    y1, s1 = check({**inp, "x": inp["x"][:, :17]})
    y2, s2 = check({**inp, "x": inp["x"][:, 17:], "state": s1})
    assert mx.allclose(mx.concatenate([y1, y2], axis=1), y_full, rtol=1e-6, atol=1e-6).item()
    assert mx.array_equal(s2, s_full).item()


def test_gradients_are_the_references():
    inp = make_inputs(3, 1, 6, 8, 4, F32, F32, True, True)
    keys = ["x", "weight", "bias", "state"]
    loss = lambda out: (out[0] ** 2).sum()  # noqa: E731
    for g, g_ref in zip(*gradients_through_kernel(mod, "causal_conv1d", inp, keys, loss)):
        assert mx.allclose(g, g_ref, rtol=1e-5, atol=1e-5).item()


def test_dispatcher_takes_the_reference_outside_the_kernel(monkeypatch):
    refuse_kernel(monkeypatch, mod)
    ok = make_inputs(4, 1, 3, 8, 4, F32, F32, True, True)
    unfit = {
        "width_1": make_inputs(4, 1, 3, 8, 1, F32, F32, True, True),
        "width_9": make_inputs(4, 1, 3, 8, 9, F32, F32, True, True),
        "state_dtype_differs": {**ok, "state": ok["state"].astype(F16)},
        "int_input": {**ok, "x": ok["x"].astype(mx.int32)},
    }
    for name, inp in unfit.items():
        mod.causal_conv1d(**inp)  # no AssertionError: the reference ran
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    mod.causal_conv1d(**ok)


def test_bug_every_block_writes_the_new_state():
    src = mod._SOURCE.replace("if (t_end == L) {", "if (true) {")
    assert src != mod._SOURCE
    kernel = msl_emu.metal_kernel(**{**mod.KERNEL_SPEC, "source": src})
    inp = make_inputs(5, 1, 40, 8, 4, F32, F32, True, True)
    with pytest.raises(MSLEmuError, match="race"):
        mod._launch(kernel, **inp)


def test_bug_ignoring_the_input_strides():
    src = mod._SOURCE.replace("x[x_bc + t * x_strides[1]]", "x[(int64_t(b) * L + t) * C + c]")
    assert src != mod._SOURCE
    kernel = msl_emu.metal_kernel(**{**mod.KERNEL_SPEC, "source": src}, layout="padded")
    inp = make_inputs(6, 2, 5, 8, 4, F32, F32, True, True)
    y, _ = mod._launch(kernel, **inp)
    assert not mx.allclose(y, mod.causal_conv1d_reference(**inp)[0]).item()


def test_kernel_source_is_lint_clean():
    assert msl_emu.lint(mod._SOURCE) == []
