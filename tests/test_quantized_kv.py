"""--kv-bits: the quantized K/V with a float tail (quantized_kv.py) in the compiled step."""

import copy

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import QuantizedKVCache, save_prompt_cache

from conftest import make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load, load_model
from mlx_falcon_h1.decode import CompiledDecode
from mlx_falcon_h1.launch_count import decode_step_launches, our_decode_step
from mlx_falcon_h1.prompt_cache_files import load_prompt_cache
from mlx_falcon_h1.quantized_kv import QuantizedKVWithTail
from mlx_falcon_h1_convert import convert

PROMPT = mx.array([[3, 17, 5, 40, 9, 11, 60, 2, 33]])
# A short tail in the model tests, so that a few dozen steps cross several flushes
# (the flush logic does not depend on the capacity; test_compiled_decode.py's
# test_kv_bits_through_the_compiled_step crosses one at the real 256).
SHORT_TAIL = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("qkv")
    make_checkpoint(path, head_dim=64, mamba_rms_norm=True)  # group sizes 32 and 64 divide it
    return load_model(path)[0]


@pytest.fixture
def short_tail(monkeypatch):
    monkeypatch.setattr(QuantizedKVWithTail, "tail_capacity", SHORT_TAIL)


def quantized_cache(model, bits, group_size):
    cache = model.make_cache()
    model(PROMPT, cache=cache)
    return [c.to_quantized(group_size=group_size, bits=bits) for c in cache]


def run(model, cache, tokens, compiled, monkeypatch, trim_at=None, trim=0):
    """Logits of one-token calls of `tokens` (B=1), the step on or off; `trim` tokens
    taken back after the call at index trim_at. Returns (logits, flushes seen)."""
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1" if compiled else "0")
    model.__dict__.pop("_compiled_decode", None)
    logits, flushes, bulk = [], 0, cache[0].kv.bulk.offset
    for i, t in enumerate(tokens):
        logits.append(model(mx.array([[t]]), cache=cache))
        mx.eval(logits[-1], [c.kv.arrays() for c in cache])
        flushes += cache[0].kv.bulk.offset > bulk
        bulk = cache[0].kv.bulk.offset
        if i == trim_at:
            for c in cache:
                c.trim(trim)
            bulk = cache[0].kv.bulk.offset
    return np.array(mx.concatenate(logits, axis=1)), flushes


def relative(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (8, 32), (8, 64)])
def test_compiled_step_matches_the_uncompiled_forward_across_flushes(model, short_tail, monkeypatch,
                                                                      bits, group_size):
    tokens = [(7 * i) % 90 + 4 for i in range(4 * SHORT_TAIL + 5)]
    runs = {}
    for compiled in (True, False):
        cache = quantized_cache(model, bits, group_size)
        runs[compiled], flushes = run(model, cache, tokens, compiled, monkeypatch)
        assert flushes == 4  # the tail moved into the bulk at each 16th token
        assert (cache[0].kv.bulk.offset, cache[0].kv.tail_len) == (PROMPT.shape[1] + 64, 5)
        if compiled:
            assert CompiledDecode.eligible(cache) and model._compiled_decode.traces >= 1
    assert relative(runs[True], runs[False]) <= 1e-5


def test_trim_across_the_tail_and_bulk(model, short_tail, monkeypatch):
    """A trim longer than the tail cuts into the bulk (as QuantizedKVCache's trim);
    both paths then go on alike."""
    tokens = [(5 * i) % 90 + 4 for i in range(2 * SHORT_TAIL + 10)]
    runs = {}
    for compiled in (True, False):
        cache = quantized_cache(model, 8, 32)
        # After the 20th call: 20 decoded = 16 in the bulk + 4 in the tail; take back 7.
        runs[compiled], _ = run(model, cache, tokens, compiled, monkeypatch, trim_at=19, trim=7)
        assert cache[0].kv.offset == PROMPT.shape[1] + len(tokens) - 7
    assert relative(runs[True], runs[False]) <= 1e-5


def test_the_newest_tokens_attend_in_float(model, monkeypatch):
    """The tail changes what is computed: attending the newest keys in float differs
    from attending them quantized (mlx-lm's QuantizedKVCache), and is closer to float K/V."""
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "0")
    tokens = [(3 * i) % 90 + 4 for i in range(12)]
    outs = {}
    for kind in ("tail", "flushed", "float"):
        cache = model.make_cache()
        model(PROMPT, cache=cache)
        if kind != "float":
            cache = [c.to_quantized(group_size=32, bits=4) for c in cache]
        logits = []
        for t in tokens:
            logits.append(model(mx.array([[t]]), cache=cache))
            if kind == "flushed":  # every token quantized as it comes
                for c in cache:
                    c.kv.flush()
        outs[kind] = np.array(mx.concatenate(logits, axis=1))
    assert relative(outs["tail"], outs["float"]) < relative(outs["flushed"], outs["float"])


def test_until_the_tail_fills_it_is_the_float_cache(model, monkeypatch):
    """Quantized from the first token (mlx-lm's --quantized-kv-start 0) and read one
    token at a time, every key is still in the tail: the float K/V's logits."""
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1")
    tokens = [(11 * i) % 90 + 4 for i in range(20)]
    outs = {}
    for kind in ("float", "quantized"):
        cache = model.make_cache()
        if kind == "quantized":
            cache = [c.to_quantized(group_size=64, bits=4) for c in cache]
        outs[kind] = np.array(mx.concatenate([model(mx.array([[t]]), cache=cache) for t in tokens], axis=1))
    assert cache[0].kv.tail_len == len(tokens) and cache[0].kv.bulk.offset == 0
    assert relative(outs["quantized"], outs["float"]) <= 1e-5


def test_the_store_holds_what_mlx_lm_quantized_cache_holds(short_tail):
    """Fed the same keys (one at a time, then a chunk, with a trim into the bulk), its
    file state is QuantizedKVCache's, array for array; nbytes, deepcopy, offsets."""
    rng = np.random.default_rng(0)
    ours, theirs = QuantizedKVWithTail(group_size=32, bits=4), QuantizedKVCache(group_size=32, bits=4)
    kv = lambda n: [mx.array(rng.standard_normal((1, 2, n, 64)).astype(np.float32)) for _ in "kv"]  # noqa: E731

    def both(n):
        k, v = kv(n)
        ours.update_and_fetch(k, v)
        theirs.update_and_fetch(k, v)

    both(5)
    for _ in range(SHORT_TAIL + 3):  # a flush, and 3 in the tail
        both(1)
    assert (ours.bulk.offset, ours.tail_len, ours.offset) == (5 + SHORT_TAIL, 3, theirs.offset)
    assert ours.trim(6) == theirs.trim(6) == 6  # 3 from the tail, 3 from the bulk
    assert (ours.bulk.offset, ours.tail_len) == (5 + SHORT_TAIL - 3, 0)
    for _ in range(4):
        both(1)
    both(3)  # a chunk: the tail goes into the bulk first
    assert ours.tail_len == 0
    for _ in range(2):
        both(1)
    copied = copy.deepcopy(ours)
    keys, values, offset, group_size, bits = ours.state
    assert (offset, group_size, bits) == (theirs.offset, 32, 4)
    for a, b in zip(keys + values, theirs.keys + theirs.values):
        assert np.array_equal(np.array(a), np.array(b[:, :, :offset]))
    assert ours.tail_len == 2  # reading the state quantized a copy, not the tail
    assert ours.nbytes == sum(a.nbytes for a in ours.arrays())
    copied.trim(copied.offset)
    assert ours.offset == theirs.offset and copied.offset == 0


def test_a_saved_cache_with_a_tail_goes_on_as_one_flushed_there(model, tmp_path, monkeypatch):
    """The file is mlx-lm's QuantizedKVCache format (tail quantized into it); loaded
    and continued, it gives the logits of the cache flushed where it was saved."""
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1")
    cache = quantized_cache(model, 8, 64)
    for t in (4, 8, 15, 16, 23):
        model(mx.array([[t]]), cache=cache)
    assert cache[0].kv.tail_len == 5
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(tmp_path / "c.safetensors", model=model)
    assert type(loaded[0].kv.bulk) is QuantizedKVCache and loaded[0].kv.tail_len == 0
    for c in cache:
        c.kv.flush()
    rest = [42, 7, 19, 88]
    a, _ = run(model, loaded, rest, True, monkeypatch)
    b, _ = run(model, cache, rest, True, monkeypatch)
    # The same keys and values; the buffers' capacities differ (the file's bulk holds
    # exactly its tokens), so the attention's float32 sums may round apart.
    assert np.abs(a - b).max() <= 1e-6 * np.abs(b).max()


def per_layer(counts):
    layer = {}
    for k in counts[1]:
        # mx.compile names a fused node after its ops: counted as one kind.
        kind = "fused elementwise" if k.startswith("Compiled") else k
        layer[kind] = layer.get(kind, 0) + counts[1].get(k, 0) - counts[0].get(k, 0)
    return {k: v for k, v in layer.items() if v}


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_launches_and_kv_bytes_of_a_quantized_step(tmp_path, kv_bits):
    """Per layer, as on a Mac, the --kv-bits step launches what the float step does
    (4 matmuls, the tail's 2 K/V writes, the MLP's gate, 5 kernels) with attention's
    two passes for one: 13, the float step's 12 + 1. The attention reads the bulk
    packed (nothing dequantizes it) and the float tail: bytes as the bits say."""
    counts, steps = {None: [], kv_bits: []}, {}
    for layers in (1, 2):
        hf, mlx = tmp_path / f"hf{layers}", tmp_path / f"mlx{layers}"
        make_checkpoint(hf, num_hidden_layers=layers, intermediate_size=128, head_dim=64)
        convert(str(hf), str(mlx), dtype="bfloat16")
        make_tokenizer(mlx)
        for bits in counts:
            steps[bits, layers] = decode_step_launches(load(str(mlx))[0], our_decode_step,
                                                       kv_bits=bits, kv_group_size=32)
            counts[bits].append(steps[bits, layers]["by_primitive"])
    float_layer, layer = per_layer(counts[None]), per_layer(counts[kv_bits])
    assert layer == {"Matmul": 4, "DynamicSliceUpdate": 2, "fused elementwise": 1,
                     "custom kernels and mx.fast ops": 6}
    assert sum(layer.values()) <= sum(float_layer.values()) + 2

    # K/V bytes: what the attention's first pass is handed (the one launch handed the
    # bulk's packed words in each layer: nothing else reads them, no dequantized copy
    # is made), each bulk array read for its first bulk_len positions and each tail
    # array for its first tail_len (a kernel reads no further), over both layers.
    step = steps[kv_bits, 2]
    attention = [ins for ins in step["kernel_inputs"] if any(a.dtype == mx.uint32 for a in ins)]
    assert len(attention) == 2
    bulk_len, tail_len = 8, 1  # the 8-token prompt quantized, this token in the tail
    read = 0
    for q, *bulk, tail_k, tail_v, _, _ in attention:  # the kernel's arrays, its order (lengths last)
        read += sum(a.nbytes // a.shape[2] * bulk_len for a in bulk)
        read += sum(a.nbytes // a.shape[2] * tail_len for a in (tail_k, tail_v))
    kv_heads, head_dim, item = 2, 64, 2  # bfloat16 scales, biases and tail
    bulk_per_token = 2 * kv_heads * (head_dim * kv_bits // 8 + 2 * head_dim // 32 * item)
    tail_per_token = 2 * kv_heads * head_dim * item
    assert read == 2 * (bulk_per_token * bulk_len + tail_per_token * tail_len)


@pytest.mark.parametrize("filled", [True, False], ids=["filled", "empty"])
def test_a_group_size_the_head_dim_cannot_take_is_refused_by_name(model, filled):
    """A library user's to_quantized: head_dim 64 and groups of 48 (or 0, which makes
    mx.quantize crash the process): a ValueError naming head_dim and what works, when
    quantizing a filled cache or at an empty one's first keys."""
    for bad in (48, 0):
        cache = model.make_cache()
        if filled:
            model(mx.array([[4, 8, 15]]), cache=cache)
        with pytest.raises(ValueError, match="head_dim 64 use --kv-group-size 32 or 64"):
            for c in cache:
                c.to_quantized(group_size=bad, bits=8)
            model(mx.array([[16]]), cache=cache)
