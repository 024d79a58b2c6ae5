"""prompt_cache.PromptCache: a prompt served from a stored entry's checkpoint gives
the logits of reading it cold, and re-reads at most one checkpoint interval beyond
the longest prefix it shares with what was stored; memory stays in the budget."""

import numpy as np
import pytest
import mlx.core as mx

from conftest import make_checkpoint
from mlx_falcon_h1 import load_model
from mlx_falcon_h1.cache import FalconH1Cache
from mlx_falcon_h1.prompt_cache import RECENT_CHECKPOINTS, PromptCache, common_prefix

INTERVAL = 64
PREFILL_STEP = 50  # generate_step's chunks, smaller than the interval: checkpoints split them
EXACT = 1e-5  # relative to the largest logit (float32)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The model and a draft of the same vocabulary (head_dim 32: --kv-bits groups of 32)."""
    loaded = []
    for seed in (0, 1):
        path = tmp_path_factory.mktemp(f"m{seed}")
        make_checkpoint(path, seed=seed, head_dim=32)
        loaded.append(load_model(path)[0])
    return loaded


def tokens(rng, n):
    return [int(t) for t in rng.randint(4, 96, n)]


def read(models, cache, rest, kv_bits=None):
    """Read `rest` as mlx-lm's generate_step does (all but the last token in chunks,
    quantizing the K/V after each with --kv-bits), then the last token: its logits,
    one array per model."""
    parts = [cache[i * len(cache) // len(models):(i + 1) * len(cache) // len(models)]
             for i in range(len(models))]
    for i in range(0, len(rest) - 1, PREFILL_STEP):
        chunk = mx.array([rest[i:min(i + PREFILL_STEP, len(rest) - 1)]])
        for model, part in zip(models, parts):
            model(chunk, cache=part)
            if kv_bits:
                for c in part:
                    c.to_quantized(group_size=32, bits=kv_bits)
        mx.eval([c.state for c in cache])
    return [np.array(model(mx.array([rest[-1:]]), cache=part)[0, -1])
            for model, part in zip(models, parts)]


def cold(models, prompt, make_cache, kv_bits=None):
    return read(models, make_cache(), prompt, kv_bits)


def assert_exact(got, want):
    for g, w in zip(got, want):
        assert np.abs(g - w).max() <= EXACT * np.abs(w).max(), np.abs(g - w).max()


def conversation_shapes(rng):
    """(name, prompt) as a chat app sends them after a first request A answered with
    `answer`; each shares a known prefix with what was stored."""
    system = tokens(rng, 90)
    first = system + tokens(rng, 210)
    answer = tokens(rng, 12)
    follow = first + answer + tokens(rng, 40)
    return first, answer, [
        ("regenerate", first),
        ("next turn", follow),
        ("edit the last message", first[:250] + tokens(rng, 30)),
        ("edit an earlier message", first[:100] + tokens(rng, 80) + first[200:]),
        ("new chat, same system prompt", system + tokens(rng, 30)),
        ("agent retry", follow),
        ("agent tool output", follow + tokens(rng, 70)),
    ]


@pytest.mark.parametrize("setting", ["plain", "kv-bits", "max-kv-size", "draft"])
def test_reuse_is_exact_and_rereads_at_most_an_interval(models, setting):
    rng = np.random.RandomState(3)
    used = models if setting == "draft" else models[:1]
    kv_bits = 8 if setting == "kv-bits" else None
    window = 512 if setting == "max-kv-size" else None  # holds these prompts: cut back exactly

    def make_cache():
        return [c for m in used for c in m.make_cache(max_kv_size=window)]

    store = PromptCache(make_cache, checkpoint_interval=INTERVAL)
    first, answer, shapes = conversation_shapes(rng)
    cache, rest = store.fetch(first, boundaries=[90])
    assert rest == first
    read(used, cache, rest, kv_bits)
    store.insert(first + answer, cache)
    seen = [first + answer]
    for name, prompt in shapes:
        cache, rest = store.fetch(prompt, boundaries=[90])
        ideal = min(max(common_prefix(s, prompt) for s in seen), len(prompt) - 1)
        assert prompt[len(prompt) - len(rest):] == rest
        assert len(rest) <= len(prompt) - ideal + INTERVAL, (name, len(rest), ideal)
        got = read(used, cache, rest, kv_bits)
        want = cold(used, prompt, make_cache, kv_bits)
        if kv_bits:
            # --kv-bits keeps the newest tokens read one at a time in float (quantized_kv.py):
            # a reused prompt's may be, where a cold read's chunk quantized them. The two
            # differ by part of the quantization's own effect, never more than all of it.
            effect = [np.abs(w - f).max() for w, f in zip(want, cold(used, prompt, make_cache))]
            assert all(np.abs(g - w).max() <= e for g, w, e in zip(got, want, effect)), name
        else:
            assert_exact(got, want)
        if name == "regenerate":
            assert len(rest) == 1, "the checkpoint before the last token is kept"
        if name == "new chat, same system prompt":
            assert len(rest) == len(prompt) - 90, "the boundary marked is a checkpoint"
        store.insert(prompt, cache)
        seen.append(prompt)


def test_a_bounded_kv_that_forgot_a_prefix_is_not_cut_back(models):
    """--max-kv-size: once the window has overwritten keys, the entry is reused only
    by prompts that extend it. (Not compared with a cold read: past its window
    mlx-lm's RotatingKVCache gives other logits for other chunkings of one prompt,
    4e-3 relative here, so a cold read is no reference.)"""
    rng = np.random.RandomState(4)

    def make_cache():
        return models[0].make_cache(max_kv_size=100)

    store = PromptCache(make_cache, checkpoint_interval=INTERVAL)
    first = tokens(rng, 300)
    cache, rest = store.fetch(first)
    read(models[:1], cache, rest)
    store.insert(first, cache)
    edited = first[:200] + tokens(rng, 5)
    assert store.fetch(edited)[1] == edited  # nothing to cut back to: read all
    extended = first + tokens(rng, 5)
    assert len(store.fetch(extended)[1]) == 5


def test_a_trim_drops_the_checkpoints_of_tokens_taken_back(models):
    """Speculative decoding takes rejected draft tokens back: no checkpoint may
    keep a state that read them."""
    model = models[0]
    cache = model.make_cache()
    for c in cache:
        c.checkpoint_interval = 32
    model(mx.array([list(range(4, 40))]), cache=cache)  # 36 tokens: a checkpoint at 32
    assert all(set(c.checkpoints) == {32} for c in cache)
    for c in cache:
        c.trim(6)
    assert all(c.checkpoints == {} for c in cache)


def test_checkpoints_are_kept_where_planned(models):
    model = models[0]
    store = PromptCache(model.make_cache, checkpoint_interval=INTERVAL)
    prompt = list(range(4, 94)) * 2  # 180 tokens
    cache, _ = store.fetch(prompt, boundaries=[10, 100, 500])
    model(mx.array([prompt[:-1]]), cache=cache)  # one call: split at each
    # every 64, at the boundaries inside the prompt, 32 before the last token (the
    # tail's distances under the interval), and before the last token
    assert all(set(c.checkpoints) == {10, 64, 100, 128, 147, 179} for c in cache)
    assert all(isinstance(c, FalconH1Cache) for c in cache)


def test_an_edit_near_the_end_rereads_a_few_times_what_it_must(models):
    """A question under a pasted document, edited: the tail checkpoints before the
    prompt's end bound the re-read to about 4x the tokens after the edit."""
    model = models[0]
    rng = np.random.RandomState(6)
    store = PromptCache(model.make_cache, checkpoint_interval=1024)
    prompt = tokens(rng, 700) + tokens(rng, 20)  # a document, then a question
    cache, rest = store.fetch(prompt)
    read([model], cache, rest)
    store.insert(prompt, cache)
    edited = prompt[:705] + tokens(rng, 15)  # the question changed after 5 tokens
    cache, rest = store.fetch(edited)
    assert len(rest) <= max(4 * (len(edited) - 705), 33), len(rest)
    assert_exact(read([model], cache, rest), cold([model], edited, model.make_cache))


def test_a_long_conversation_keeps_checkpoints_every_interval_and_a_few_recent(models):
    """Forty short turns: the conversation's entry keeps its checkpoints every
    interval, the RECENT_CHECKPOINTS deepest others and its first, not every turn's."""
    model = models[0]
    rng = np.random.RandomState(7)
    store = PromptCache(model.make_cache, checkpoint_interval=128)
    conversation = tokens(rng, 30)
    for turn in range(40):
        cache, rest = store.fetch(conversation, boundaries=[len(conversation) - 5])
        model(mx.array([rest]), cache=cache)
        mx.eval([c.state for c in cache])
        conversation = conversation + tokens(rng, 10)
        store.insert(conversation[:cache[0].offset], cache)
    assert len(store) == 1
    (entry,) = store._entries.values()
    every = [p for p in entry.checkpoints if p % 128 == 0]
    assert len(every) == len(conversation) // 128
    others = sorted(p for p in entry.checkpoints if p % 128)
    assert len(others) == RECENT_CHECKPOINTS + 1
    assert others[0] == 25  # the first request's boundary: a system prompt's end
    assert others[1] > len(conversation) - 100


def test_memory_stays_in_budget_under_random_branching(models):
    """Hundreds of requests branching at random from earlier ones: the store never
    holds more than its budget, and what it serves is still exact."""
    model = models[0]
    rng = np.random.RandomState(5)
    one = model.make_cache()
    model(mx.array([tokens(rng, 100)]), cache=one)
    mx.eval([c.state for c in one])
    budget = 6 * sum(c.nbytes for c in one)  # a few entries' worth
    store = PromptCache(model.make_cache, max_entries=50, max_bytes=budget, checkpoint_interval=16)
    history = [tokens(rng, 40)]
    for i in range(200):
        base = history[rng.randint(len(history))]
        prompt = base[:rng.randint(1, len(base) + 1)] + tokens(rng, rng.randint(1, 30))
        cache, rest = store.fetch(prompt)
        if i % 40 == 0:
            assert_exact(read([model], cache, rest), cold([model], prompt, model.make_cache))
        else:
            model(mx.array([rest]), cache=cache)
            mx.eval([c.state for c in cache])
        store.insert(prompt, cache)
        assert store.nbytes <= budget, (i, store.nbytes, budget)
        history.append(prompt)
    assert len(store) >= 2 and store.checkpoint_count > 0


def test_bad_interval_is_refused():
    with pytest.raises(ValueError, match="checkpoint_interval"):
        PromptCache(checkpoint_interval=0)
