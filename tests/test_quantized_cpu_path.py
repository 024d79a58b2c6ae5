"""Quantized projections with many rows on the CPU: dequantize + BLAS (linear.py)
against MLX's quantized matmul, per layer and through a whole quantized model."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_falcon_h1 import linear as linear_module
from mlx_falcon_h1.benchmark import make_random_model
from mlx_falcon_h1.decode import compiled_decode
from mlx_falcon_h1.linear import _DEQUANTIZE_ROWS, linear
from mlx_falcon_h1.loading import load_model

# Every mode MLX quantizes in, affine at each width.
MODES = [("affine", b) for b in (2, 3, 4, 5, 6, 8)] + [(m, None) for m in ("mxfp4", "nvfp4", "mxfp8")]
BF16_ULP = 2.0**-8  # the spacing of bfloat16 numbers in [1, 2)

assert mx.default_device() == mx.cpu  # what this file is about


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def quantized_layer(mode, bits, weight_dtype=mx.float32, seed=0, in_dims=256, out_dims=384):
    dense = nn.Linear(in_dims, out_dims, bias=True)
    keys = mx.random.split(mx.random.key(seed))
    dense.weight = mx.random.normal((out_dims, in_dims), key=keys[0]) * 0.05
    dense.bias = mx.random.normal((out_dims,), key=keys[1])
    dense.set_dtype(weight_dtype)
    return nn.QuantizedLinear.from_linear(dense, 64 if mode == "affine" else None, bits, mode=mode)


def exact_product(layer, x) -> np.ndarray:
    """x @ W^T + b in float64 over the stored weights (scale * q + bias)."""
    affine = layer.get("biases") is not None
    scales = layer.scales.astype(mx.float32) if affine else layer.scales
    biases = layer.biases.astype(mx.float32) if affine else None
    w = mx.dequantize(layer.weight, scales, biases, layer.group_size, layer.bits, mode=layer.mode, dtype=mx.float32)
    w = np.asarray(w, dtype=np.float64)
    xs = np.asarray(x.astype(mx.float32), dtype=np.float64)
    return xs @ w.T + np.asarray(layer.bias.astype(mx.float32), dtype=np.float64)


def f64(a) -> np.ndarray:
    return np.asarray(a.astype(mx.float32), dtype=np.float64)


@pytest.fixture
def count_quantized_matmuls(monkeypatch):
    """How many times MLX's quantized matmul is called (the layer's own path)."""
    calls = []
    original = mx.quantized_matmul

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", counting)
    return calls


@pytest.mark.parametrize("weight_dtype", [mx.float32, mx.bfloat16], ids=["f32-weights", "bf16-weights"])
@pytest.mark.parametrize("mode,bits", MODES)
def test_many_rows_take_blas_and_match_the_quantized_matmul(mode, bits, weight_dtype, count_quantized_matmuls):
    layer = quantized_layer(mode, bits, weight_dtype)
    x = mx.random.normal((2, _DEQUANTIZE_ROWS[mode], 256), key=mx.random.key(1))  # 2x the threshold
    ours = linear(layer, x)
    assert count_quantized_matmuls == []  # the fast path, not the layer's
    ref = layer(x)
    assert count_quantized_matmuls == [1]
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    # Float32 activations: within float32 rounding, also from bfloat16 scales
    # (which mx.dequantize alone would round the weights through: ~5e-3).
    assert rel(f64(ours), f64(ref)) <= 1e-5
    assert rel(f64(ours), exact_product(layer, x)) <= 1e-5


@pytest.mark.parametrize("weight_dtype", [mx.float32, mx.bfloat16], ids=["f32-weights", "bf16-weights"])
@pytest.mark.parametrize("mode,bits", MODES)
def test_bfloat16_activations_are_within_bfloat16_rounding(mode, bits, weight_dtype):
    """MLX's CPU quantized matmul sums bfloat16 inputs in bfloat16 (3-5e-2 off the
    exact product here); ours sums in float32 and rounds once or twice (the
    product, then the layer's bias add, as the layer does)."""
    layer = quantized_layer(mode, bits, weight_dtype, seed=2)
    x = mx.random.normal((3, 70, 256), key=mx.random.key(3)).astype(mx.bfloat16)
    ours, ref = linear(layer, x), layer(x)
    assert ours.dtype == ref.dtype
    exact = exact_product(layer, x)
    assert rel(f64(ours), exact) <= 2 * BF16_ULP  # (not compared with MLX's: a release may sum in float32)


@pytest.mark.parametrize("mode,bits", [("affine", 4), ("mxfp4", None)])
def test_few_rows_and_the_switch_keep_the_quantized_matmul(mode, bits, monkeypatch, count_quantized_matmuls):
    layer = quantized_layer(mode, bits)
    few = mx.random.normal((1, _DEQUANTIZE_ROWS[mode] - 1, 256), key=mx.random.key(4))
    one = few[:, :1]  # decode
    many = mx.random.normal((1, 4 * _DEQUANTIZE_ROWS[mode], 256), key=mx.random.key(5))
    linear(layer, one), linear(layer, few)
    assert len(count_quantized_matmuls) == 2
    monkeypatch.setenv("MLX_FALCON_H1_DEQUANTIZE_MATMUL", "0")
    assert rel(f64(linear(layer, many)), f64(layer(many))) == 0.0
    assert len(count_quantized_matmuls) == 4
    monkeypatch.setenv("MLX_FALCON_H1_DEQUANTIZE_MATMUL", "1")
    linear(layer, many)
    assert len(count_quantized_matmuls) == 4


def test_other_devices_keep_the_quantized_matmul(monkeypatch, count_quantized_matmuls):
    """On a Mac's GPU MLX's quantized matmul is the fast path."""
    layer = quantized_layer("affine", 4)
    x = mx.random.normal((1, 64, 256), key=mx.random.key(6))
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    linear(layer, x)
    assert count_quantized_matmuls == [1]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_random_model("tiny", tmp_path_factory.mktemp("tiny"), "float32")


def quantized_model(folder):
    model = load_model(folder)[0]
    nn.quantize(model, group_size=64, bits=4)
    return model


@pytest.fixture(scope="module")
def quantized_tiny(tiny_folder):
    return quantized_model(tiny_folder)


def test_quantized_model_logits_with_and_without_the_fast_path(quantized_tiny, monkeypatch):
    """Prefill of a 70-token prompt, then three decode steps: float32 logits with the
    path on and off within 1e-5 relative; the path serves every projection."""
    model = quantized_tiny
    dense_calls = []
    original = linear_module.dequantized_matmul
    monkeypatch.setattr(linear_module, "dequantized_matmul", lambda l, x: dense_calls.append(1) or original(l, x))
    prompt = mx.random.randint(0, model.args.vocab_size, (1, 70), key=mx.random.key(7))
    steps = [mx.array([[5]]), mx.array([[17]]), mx.array([[300]])]
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("MLX_FALCON_H1_DEQUANTIZE_MATMUL", switch)
        cache = model.make_cache()
        logits = [model(prompt, cache)]
        prefill_calls = len(dense_calls)
        logits += [model(token, cache) for token in steps]
        mx.eval(logits)
        assert len(dense_calls) == prefill_calls  # decode (one row) keeps the quantized matmul
        runs[switch] = [f64(l) for l in logits]
        if switch == "1":
            # q, k, v, o, in_proj, out_proj, gate, up, down per layer, and the head
            assert prefill_calls == 9 * len(model.layers) + 1
            dense_calls.clear()
    assert dense_calls == []
    for on, off in zip(runs["1"], runs["0"]):
        assert rel(on, off) <= 1e-5


def test_no_dequantized_weights_stay_in_memory(quantized_tiny):
    """The dequantized matrices are transient: after a forward pass active memory
    is back where it was, plus the logits (the smallest float matrix is 128 KB)."""
    model = quantized_tiny
    prompt = mx.random.randint(0, model.args.vocab_size, (1, 70), key=mx.random.key(8))
    mx.eval(model(prompt))  # one-time allocations (compiled functions, constants)
    mx.clear_cache()
    before = mx.get_active_memory()
    logits = model(prompt)
    mx.eval(logits)
    assert mx.get_active_memory() - before - logits.nbytes < 64 * 1024


def test_batched_compiled_decode_takes_the_path(tiny_folder, monkeypatch):
    """Four sequences decoding: four rows per projection, inside the compiled
    step (traced once per model, so each switch setting gets its own model)."""
    dense_calls = []
    original = linear_module.dequantized_matmul
    monkeypatch.setattr(linear_module, "dequantized_matmul", lambda l, x: dense_calls.append(1) or original(l, x))
    prompts = mx.random.randint(0, 512, (4, 20), key=mx.random.key(9))
    steps = [mx.array([[5], [6], [7], [8]]), mx.array([[50], [60], [70], [80]])]
    runs = {}
    for switch in ("1", "0"):
        monkeypatch.setenv("MLX_FALCON_H1_DEQUANTIZE_MATMUL", switch)
        model = quantized_model(tiny_folder)
        cache = model.make_cache()
        mx.eval(model(prompts, cache))
        dense_calls.clear()
        logits = [model(token, cache) for token in steps]
        mx.eval(logits)
        assert (len(dense_calls) > 0) == (switch == "1")
        assert compiled_decode(model).traces == 1  # the second step replayed the trace
        runs[switch] = [f64(l) for l in logits]
    for on, off in zip(runs["1"], runs["0"]):
        assert rel(on, off) <= 1e-5
