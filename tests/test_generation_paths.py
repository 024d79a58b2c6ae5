"""mlx-lm's generation machinery on our model: each path gives what one unbatched run gives."""

import numpy as np
import pytest
import mlx.core as mx
from mlx_lm.generate import batch_generate, generate, generate_step
from mlx_lm.models.cache import (
    KVCache,
    QuantizedKVCache,
    load_prompt_cache,
    save_prompt_cache,
    trim_prompt_cache,
)

from conftest import assert_close_logits, make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load
from mlx_falcon_h1.cache import ROLLBACK_JOIN_PARTS, FalconH1Cache


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A model and a differently seeded draft sharing its tokenizer."""
    made = {}
    for name, seed in (("main", 0), ("draft", 1)):
        path = tmp_path_factory.mktemp(name)
        make_checkpoint(path, seed=seed, mamba_n_groups=2, mamba_rms_norm=True)
        make_tokenizer(path)
        made[name] = load(str(path))
    return made


def prompt(rng, n):
    return rng.integers(4, 96, size=n).tolist()  # ids 0-3 are special


def greedy_alone(model, ids, n):
    """Tokens and their log-probabilities from mlx-lm's unbatched loop."""
    tokens, logprobs = [], []
    for token, lp in generate_step(mx.array(ids), model, max_tokens=n):
        tokens.append(int(token))
        logprobs.append(float(lp[token]))
    return tokens, logprobs


def test_batch_of_mixed_lengths_matches_each_alone(pair, rng):
    model, tokenizer = pair["main"]
    prompts = [prompt(rng, 70), prompt(rng, 3), prompt(rng, 37)]
    out = batch_generate(
        model, tokenizer, prompts, max_tokens=10, prefill_step_size=16,
        return_token_ids=True, return_logprobs=True,
    )  # fmt: skip
    for ids, tokens, logprobs in zip(prompts, out.token_ids, out.logprobs):
        want_tokens, want_logprobs = greedy_alone(model, ids, len(tokens))
        assert len(tokens) > 0 and tokens == want_tokens
        np.testing.assert_allclose(logprobs, want_logprobs, atol=1e-4)


def test_padding_does_not_touch_the_state(pair, rng):
    """Right-padded prefill: each row's states equal its unpadded run."""
    model, _ = pair["main"]
    long, short = prompt(rng, 40), prompt(rng, 9)
    caches = [FalconH1Cache.merge([FalconH1Cache(), FalconH1Cache()]) for _ in model.layers]
    for c in caches:
        c.prepare(lengths=[40, 9], right_padding=[0, 31])
    model(mx.array([long, short + [0] * 31]), cache=caches)
    for c in caches:
        c.finalize()
    alone = model.make_cache()
    model(mx.array([short]), cache=alone)
    for c, a in zip(caches, alone):
        np.testing.assert_allclose(np.array(c.ssm_state[1]), np.array(a.ssm_state[0]), atol=1e-5)
        # Raw in_proj outputs: an optimized BLAS rounds a 2 x 40-row matmul and a
        # 9-row one differently (3.6e-7 measured); a padded position would be O(1).
        np.testing.assert_allclose(np.array(c.conv_state[1]), np.array(a.conv_state[0]), atol=1e-5)


def test_speculative_decoding_matches_plain_greedy(pair, rng):
    model, tokenizer = pair["main"]
    text_prompt = "def return if else for in"
    plain = generate(model, tokenizer, text_prompt, max_tokens=24)
    for draft in (model, pair["draft"][0]):  # always / rarely accepted drafts
        with_draft = generate(
            model, tokenizer, text_prompt, max_tokens=24, draft_model=draft, num_draft_tokens=4
        )
        assert with_draft == plain


def test_prompt_cache_file_round_trip(pair, rng, tmp_path):
    model, _ = pair["main"]
    ids = prompt(rng, 60)
    full = np.array(model(mx.array([ids])))
    cache = model.make_cache()
    mx.eval(model(mx.array([ids[:45]]), cache=cache))
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache, {"note": "test"})
    loaded, meta = load_prompt_cache(str(tmp_path / "c.safetensors"), return_metadata=True)
    assert meta == {"note": "test"} and all(isinstance(c, FalconH1Cache) for c in loaded)
    rest = np.concatenate(
        [np.array(model(mx.array([[t]]), cache=loaded)) for t in ids[45:]], axis=1
    )
    assert_close_logits(rest, full[:, 45:])


@pytest.mark.parametrize("prefill, steps, back", [(45, 10, 5), (20, 3, 4), (50, 40, 32), (8, 0, 8)])
def test_trim_and_refeed_matches_untrimmed(pair, rng, prefill, steps, back):
    model, _ = pair["main"]
    ids = prompt(rng, prefill + steps)
    full = np.array(model(mx.array([ids])))
    cache = model.make_cache()
    model(mx.array([ids[:prefill]]), cache=cache)
    for t in ids[prefill:]:
        model(mx.array([[t]]), cache=cache)
    assert trim_prompt_cache(cache, back) == back
    assert cache[0].offset == len(ids) - back
    refed = np.array(model(mx.array([ids[len(ids) - back :]]), cache=cache))
    assert_close_logits(refed, full[:, len(ids) - back :])


def test_decode_keeps_rollback_rows_apart(pair, rng):
    """A decode step adds its rollback row as a part of the window (a concatenate
    per layer per token would be a launch each on a Mac); the parts are joined every
    ROLLBACK_JOIN_PARTS tokens and when read: the rows a prompt call keeps."""
    model, _ = pair["main"]
    ids = prompt(rng, 60)
    stepped, prompted = model.make_cache(), model.make_cache()
    model(mx.array([ids[:4]]), cache=stepped)
    parts = []
    for t in ids[4:]:
        model(mx.array([[t]]), cache=stepped)
        parts.append(len(stepped[0]._rollback_parts))
    assert max(parts) == ROLLBACK_JOIN_PARTS and min(parts) == 1
    model(mx.array([ids]), cache=prompted)
    window = model.rollback_tokens
    np.testing.assert_allclose(np.array(stepped[0].rollback_inputs[:, -window:]),
                               np.array(prompted[0].rollback_inputs[:, -window:]), rtol=1e-5, atol=1e-5)
    assert len(stepped[0]._rollback_parts) == 1  # read: joined


def test_trim_beyond_the_window_is_refused(pair, rng):
    model, _ = pair["main"]
    cache = model.make_cache()
    model(mx.array([prompt(rng, 100)]), cache=cache)
    assert cache[0].trimmable == model.rollback_tokens
    with pytest.raises(ValueError, match=r"cannot roll the SSM state back 33 tokens; 32 can be"):
        cache[0].trim(33)


def test_kv_bits_quantizes_attention_only(tmp_path):
    make_checkpoint(tmp_path, head_dim=32)  # K/V quantization groups run along head_dim
    make_tokenizer(tmp_path)
    model, tokenizer = load(str(tmp_path))
    cache = model.make_cache()
    text = generate(model, tokenizer, "def if for", max_tokens=8, kv_bits=8, kv_group_size=32,
                    quantized_kv_start=0, prompt_cache=cache)  # fmt: skip
    assert text
    assert all(isinstance(c.kv, QuantizedKVCache) and c.bits == 8 for c in cache)
    assert all(c.ssm_state.dtype == mx.float32 for c in cache)


def test_forward_never_evaluates(pair, rng):
    """Inside mx.compile any evaluation raises, so the forward (prefill, decode step,
    window replay, trim replay, padded batch prompt) must build a pure graph."""
    model, _ = pair["main"]
    ids = mx.array([prompt(rng, 80)])
    cache = model.make_cache()

    def forward(ids):  # everything depends on the traced input, so nothing can be evaluated
        out = model(ids[:, :40], cache=cache)
        for i in range(40, 80):  # past 2 x 32 window tokens: one window replay
            out = out + model(ids[:, i : i + 1], cache=cache).sum()
        trim_prompt_cache(cache, 3)
        out = out.sum() + model(ids[:, 77:], cache=cache).sum()
        batch = [FalconH1Cache.merge([FalconH1Cache(), FalconH1Cache()]) for _ in model.layers]
        for c in batch:
            c.prepare(lengths=[5, 2], right_padding=[0, 3])
        return out + model(mx.concatenate([ids[:, :5]] * 2), cache=batch).sum()

    mx.compile(forward)(ids)


def test_kv_storage_grows_in_steps(pair, rng):
    model, _ = pair["main"]
    cache = model.make_cache()
    buffers = set()
    for t in prompt(rng, 600):
        model(mx.array([[t]]), cache=cache)
        buffers.add(cache[0].kv.keys.shape[2])
    # mlx-lm's KVCache grows by its `step` (256 in 0.32): 3 allocations for 600 tokens, not 600
    step = KVCache.step
    assert buffers == {step * k for k in range(1, -(-600 // step) + 1)}
    assert cache[0].nbytes >= cache[0].kv.keys.nbytes + cache[0].ssm_state.nbytes
