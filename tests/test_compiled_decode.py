"""The compiled decode step (decode.py) and the launch counter (launch_count.py)."""

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.generate import batch_generate, generate_step
from mlx_lm.models.cache import KVCache, QuantizedKVCache

from conftest import make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load, load_model
from mlx_falcon_h1.decode import CompiledDecode
from mlx_falcon_h1.benchmark import load_ours, make_random_model
from mlx_falcon_h1.launch_count import decode_step_launches, our_decode_step
from mlx_falcon_h1.released_shapes import RELEASED
from mlx_falcon_h1_convert import convert

PROMPT = mx.array([[3, 17, 5, 40, 9, 11, 60, 2, 33]])
# The K/V buffers grow by mlx-lm's KVCache.step (256 in 0.32); a compiled step
# retraces at each capacity it meets.
STEP = KVCache.step


def capacities(first: int, last: int) -> int:
    """How many K/V buffer capacities hold first .. last tokens."""
    return -(-last // STEP) - -(-first // STEP) + 1


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled")
    make_checkpoint(path, mamba_rms_norm=True, attention_bias=True)
    return load_model(path)[0]


def decode(model, steps, compiled, monkeypatch):
    """Greedy decode after PROMPT: (logits per step, tokens), with the step on or off."""
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1" if compiled else "0")
    cache = model.make_cache()
    logits = model(PROMPT, cache=cache)[:, -1:]
    out, tokens = [], []
    for _ in range(steps):
        token = logits.argmax(-1)
        logits = model(token, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        out.append(np.array(logits[0, 0]))
        tokens.append(token.item())
    return np.stack(out), tokens


def test_compiled_step_is_on_and_matches_the_uncompiled_path(model, monkeypatch):
    step = CompiledDecode(model)
    calls = []

    def counting(m, tokens, cache):
        calls.append(1)
        return CompiledDecode.__call__(step, m, tokens, cache)

    monkeypatch.setitem(model.__dict__, "_compiled_decode", type("S", (), {
        "__call__": staticmethod(counting), "eligible": staticmethod(CompiledDecode.eligible)})())
    compiled, tokens = decode(model, 256, True, monkeypatch)
    assert len(calls) == 256  # every decode step took it (the first one eagerly)
    # Retraced only when the K/V buffers grow: 9 + 256 tokens -> 2 with a 256-token step.
    assert step.traces == capacities(PROMPT.shape[1] + 2, PROMPT.shape[1] + 256)
    eager, eager_tokens = decode(model, 256, False, monkeypatch)
    assert len(calls) == 256  # off with MLX_FALCON_H1_COMPILE=0
    assert tokens == eager_tokens  # greedy output identical over 256 tokens
    assert np.abs(compiled - eager).max() <= 1e-5 * np.abs(eager).max()


def test_generation_uses_it_through_mlx_lm(model, monkeypatch):
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1")
    model.__dict__.pop("_compiled_decode", None)
    list(generate_step(PROMPT[0], model, max_tokens=5))
    assert model._compiled_decode.traces == 1


def test_caches_it_cannot_express_take_the_uncompiled_path(model):
    """Layers whose K/V caches disagree, and a batch still taking padded prompts."""
    cache = model.make_cache()
    assert not CompiledDecode.eligible(cache)  # nothing cached yet: the prompt runs first
    model(PROMPT, cache=cache)
    assert CompiledDecode.eligible(cache)
    cache[1].kv = QuantizedKVCache(group_size=32, bits=8)  # layers disagree
    assert not CompiledDecode.eligible(cache)
    cache = model.make_cache()
    model(PROMPT, cache=cache)
    cache[0].lengths = mx.array([3])
    assert not CompiledDecode.eligible(cache)


def test_after_a_trim_the_step_replays_the_rollback(model, monkeypatch):
    """Speculative decoding rolls the cache back, then decodes on: same logits as eager."""
    results = []
    for compiled in (True, False):
        monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1" if compiled else "0")
        cache = model.make_cache()
        model(PROMPT, cache=cache)
        for t in (4, 8, 15, 16):
            model(mx.array([[t]]), cache=cache)
        for c in cache:
            c.trim(3)
        logits = [model(mx.array([[t]]), cache=cache) for t in (21, 22, 23)]
        results.append(np.array(mx.concatenate(logits, axis=1)))
    assert np.abs(results[0] - results[1]).max() <= 1e-5 * np.abs(results[1]).max()


def test_launch_counter(tmp_path):
    """Metal-path launches per layer: the compiled step below the uncompiled one and
    below stock mlx-lm's on the same folder; custom kernels and mx.fast ops counted once."""
    make_checkpoint(tmp_path / "hf", mamba_rms_norm=True)
    convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    ours = load_model(tmp_path / "mlx")[0]
    stock = mlx_lm.utils.load_model(tmp_path / "mlx")[0]
    compiled = decode_step_launches(ours, our_decode_step)
    eager = decode_step_launches(ours, lambda m, t, c: m.forward(t, c))
    theirs = decode_step_launches(stock)
    layers = len(ours.layers)
    # Per layer: 2 RMSNorms, the gated norm, RoPE, attention, the decode kernel.
    assert compiled["by_primitive"]["custom kernels and mx.fast ops"] == 6 * layers + 1
    assert compiled["by_primitive"]["Matmul"] == 9 * layers + 1  # 9 projections + head
    assert compiled["per_layer"] < eager["per_layer"]
    assert compiled["per_layer"] < theirs["per_layer"]


def layer_launches(folders, kv_bits=None) -> dict:
    """Launches of one layer of our step as a Mac runs it, by kind: the difference
    between models of 1 and 2 layers (folders[0], folders[1]), loaded for
    generation; kv_bits: the K/V quantized (groups of 64) before the step."""
    counts = [decode_step_launches(load_ours(folder), our_decode_step, kv_bits=kv_bits)["by_primitive"]
              for folder in folders]
    layer = {}
    for k in counts[1]:
        # mx.compile names a fused node after its ops (CompiledSigmoidMultiplyMultiply
        # in mlx 0.32, from how nn.silu is written): MLX's naming, counted as one kind.
        kind = "fused elementwise" if k.startswith("Compiled") else k
        layer[kind] = layer.get(kind, 0) + counts[1].get(k, 0) - counts[0].get(k, 0)
    return {k: v for k, v in layer.items() if v}


def generation_layer(bits, norm: bool) -> dict:
    """A decode layer's launches when load() fuses its projections: 4 matmuls, 2 K/V
    writes, the MLP's gate and the kernels: residual add + norm twice, RoPE,
    attention and the mixer's step writing out_proj's whole input, and with the
    gated norm its kernel after the step's (12 launches, 13 with the norm); no
    cast of a weight, no concatenate, no separate add."""
    matmul = "QuantizedMatmul" if bits else "Matmul"
    return {matmul: 4, "DynamicSliceUpdate": 2, "fused elementwise": 1,
            "custom kernels and mx.fast ops": 6 if norm else 5}


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("norm", [False, True], ids=["no_norm", "gated_norm"])
def test_launches_of_a_generation_layer(tmp_path, bits, norm):
    """A converted checkpoint's layer (bfloat16 or 4-bit weights; the 0.5B's kind of
    mixer, or the gated norm's: 1.5B-Deep, 7B, 34B): generation_layer's breakdown."""
    folders = []
    for layers in (1, 2):
        hf, mlx = tmp_path / f"hf{layers}", tmp_path / f"mlx{layers}"
        make_checkpoint(hf, num_hidden_layers=layers, intermediate_size=128, mamba_rms_norm=norm)
        convert(str(hf), str(mlx), dtype="bfloat16", quantize=bits is not None, q_bits=bits,
                q_group_size=32)
        folders.append(mlx)
    assert layer_launches(folders) == generation_layer(bits, norm)


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("shape", list(RELEASED))
def test_launches_per_layer_at_every_released_shape(tmp_path, shape, bits):
    """Every released shape's decode layer, bf16 and 4-bit (group size 64): the
    breakdown above, at most 13; with --kv-bits 8, one more. The layers keep the shape's attention heads and
    head dim, its mixer's heads, head dim, state size and groups, and its norm
    (what decides which kernel takes a call); the hidden and MLP widths are cut to
    256 and the vocabulary to 1,024, which decide no dispatch (the benchmark's
    --mac-prediction counts the full widths)."""
    cut = dict(hidden_size=256, intermediate_size=256, vocab_size=1024)
    folders = [make_random_model(shape, tmp_path / str(n), "bfloat16", n, cut, bits) for n in (1, 2)]
    layer = layer_launches(folders)
    assert layer == generation_layer(bits, RELEASED[shape].get("mamba_rms_norm", False))
    assert sum(layer.values()) <= 13
    # --kv-bits 8: the same, but attention's two passes over the quantized K/V and its
    # float tail (quantized_kv.py) where MLX's sdpa was one: at most 2 more.
    quantized = layer_launches(folders, kv_bits=8)
    kernels = "custom kernels and mx.fast ops"
    assert quantized == dict(layer, **{kernels: layer[kernels] + 1})
    assert sum(quantized.values()) <= sum(layer.values()) + 2


def test_batch_generation_uses_it(tmp_path, monkeypatch):
    """mlx-lm's batch generation (the server's path): the compiled step serves its
    BatchKVCache-backed caches, with each prompt's own tokens and log-probabilities."""
    make_checkpoint(tmp_path, mamba_rms_norm=True)
    make_tokenizer(tmp_path)
    model, tokenizer = load(str(tmp_path))
    prompts = [[5, 9, 14, 22, 7, 30, 41], [8, 4], [17, 25, 33, 12]]
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MLX_FALCON_H1_COMPILE", flag)
        model.__dict__.pop("_compiled_decode", None)
        out = batch_generate(model, tokenizer, prompts, max_tokens=12,
                             return_token_ids=True, return_logprobs=True)  # fmt: skip
        runs[flag] = (out.token_ids, out.logprobs)
        if flag == "1":
            assert model._compiled_decode.traces >= 1
    assert runs["1"][0] == runs["0"][0]
    for a, b in zip(runs["1"][1], runs["0"][1]):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_kv_bits_through_the_compiled_step(tmp_path, monkeypatch):
    """--kv-bits: the quantized K/V cache inside the step, same logits as uncompiled."""
    make_checkpoint(tmp_path, head_dim=32, mamba_rms_norm=True)
    model = load_model(tmp_path)[0]
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("MLX_FALCON_H1_COMPILE", flag)
        model.__dict__.pop("_compiled_decode", None)
        cache = model.make_cache()
        model(PROMPT, cache=cache)
        for c in cache:
            c.to_quantized(group_size=32, bits=4)
        logits = []
        for t in range(260):  # across a buffer growth
            logits.append(model(mx.array([[t % 90 + 4]]), cache=cache))
            mx.eval(logits[-1], [c.state for c in cache])
        runs[flag] = np.array(mx.concatenate(logits, axis=1))
        if flag == "1":
            assert QuantizedKVCache.step == STEP
            traces = capacities(PROMPT.shape[1] + 1, PROMPT.shape[1] + 260)
            assert CompiledDecode.eligible(cache) and model._compiled_decode.traces == traces
    assert np.abs(runs["1"] - runs["0"]).max() <= 1e-5 * np.abs(runs["0"]).max()


def test_traces_are_bounded(model, monkeypatch):
    """A server meets many (batch size, K/V capacity) shapes: at most MAX_TRACES are
    kept, capacities stay multiples of KVCache.step, and every step is still right."""
    import mlx_falcon_h1.decode as decode_module

    monkeypatch.setattr(decode_module, "MAX_TRACES", 2)
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1")
    model.__dict__.pop("_compiled_decode", None)
    for batch in (1, 2, 3, 1):
        cache = model.make_cache()
        model(mx.concatenate([PROMPT] * batch), cache=cache)
        for t in (7, 8):
            token = mx.full((batch, 1), t)
            got = model(token, cache=cache)
            monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "0")
            ref_cache = model.make_cache()
            model(mx.concatenate([PROMPT] * batch), cache=ref_cache)
            if t == 8:
                model(mx.full((batch, 1), 7), cache=ref_cache)
            want = model(token, cache=ref_cache)
            monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1")
            np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-5, atol=1e-5)
        assert len(model._compiled_decode._shapes) <= 2
        assert all(c.kv.keys.shape[2] % STEP == 0 for c in cache)


def test_a_cache_for_another_model_is_refused(model):
    """One layer short (a prompt-cache file of another model, loaded by mlx-lm's own
    loader): both paths refuse it instead of running only the first layers."""
    cache = model.make_cache()
    model(PROMPT, cache=cache)
    for tokens in (PROMPT, mx.array([[4]])):
        with pytest.raises(ValueError, match="made for another model"):
            model(tokens, cache=cache[:-1])
