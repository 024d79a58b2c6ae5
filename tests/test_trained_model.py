"""The trained fixture (examples/train_tiny_falcon_h1.py) against transformers.

A real model, not a random one: its next-token distributions are peaked, so
perplexity and greedy decoding are meaningful checks of the whole stack
(tokenizer, loader, prefill, cached decode) in float32.
"""

import json
import math
from pathlib import Path

import mlx.core as mx
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, FalconH1ForCausalLM

from mlx_falcon_h1 import load
from mlx_falcon_h1.evaluate import cast_model, default_text_path, load_tokens, perplexity

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_falcon_h1_hf"
MAX_TOKENS = 1024  # keeps the two float32 forward passes to a few seconds
SEQ_LEN = 256


@pytest.fixture(scope="module")
def reference():
    return FalconH1ForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ours():
    model, tokenizer = load(str(FIXTURE))
    return cast_model(model, "float32"), tokenizer


@pytest.fixture(scope="module")
def heldout_ids(ours):
    return load_tokens(ours[1], default_text_path().read_text(encoding="utf-8"), MAX_TOKENS)


def test_fixture_is_a_real_falcon_h1():
    """The architecture features the fixture exists to exercise are all on."""
    config = json.loads((FIXTURE / "config.json").read_text())
    assert config["model_type"] == "falcon_h1"
    assert config["num_hidden_layers"] >= 4
    assert config["num_key_value_heads"] < config["num_attention_heads"]  # GQA
    assert config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]
    assert config["mamba_rms_norm"] is True and config["mamba_n_groups"] == 1
    assert config["tie_word_embeddings"] is False
    assert config["lm_head_multiplier"] != 1.0 and config["key_multiplier"] != 1.0
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (FIXTURE / name).is_file(), name
    size = sum(f.stat().st_size for f in FIXTURE.iterdir())
    assert size < 16e6, f"fixture is {size / 1e6:.1f} MB"


def test_training_log_shows_learning():
    """The committed run beat a unigram model by a wide margin on held-out text."""
    log = json.loads((FIXTURE / "training_log.json").read_text())
    assert log["heldout_perplexity"] < 0.5 * log["unigram_perplexity"]


def test_tokenizers_agree(ours, heldout_ids):
    hf = AutoTokenizer.from_pretrained(FIXTURE)
    text = default_text_path().read_text(encoding="utf-8")
    assert hf(text, verbose=False)["input_ids"][:MAX_TOKENS] == heldout_ids.tolist()
    assert heldout_ids[0] == hf.bos_token_id


def test_perplexity_matches_transformers(reference, ours, heldout_ids):
    model, _ = ours
    got = perplexity(model, heldout_ids, SEQ_LEN)

    # transformers' loss, computed directly: the same windows of SEQ_LEN + 1
    # tokens overlapping by one, so every token after the first is a target once.
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(heldout_ids) - 1, SEQ_LEN):
            window = torch.as_tensor(heldout_ids[start : start + SEQ_LEN + 1], dtype=torch.long)
            logits = reference(window[None, :-1]).logits[0]
            nll += float(F.cross_entropy(logits, window[1:], reduction="sum"))
            count += len(window) - 1
    expected = math.exp(nll / count)

    assert got["tokens"] == count == MAX_TOKENS - 1
    assert abs(got["perplexity"] - expected) <= 1e-3 * expected, (got["perplexity"], expected)


PROMPTS = ["def fibonacci(n):", "class Stack:\n    def push(self, item"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_matches_transformers(reference, ours, prompt):
    model, tokenizer = ours
    ids = tokenizer.encode(prompt)
    eos = reference.generation_config.eos_token_id
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
    expected = out[0, len(ids) :].tolist()

    # Ours: one prefill call, then one-token steps through the cache.
    cache = model.make_cache()
    logits = model(mx.array([ids]), cache=cache)
    got = []
    for _ in range(32):
        token = int(mx.argmax(logits[0, -1]).item())
        got.append(token)
        if token == eos:
            break
        logits = model(mx.array([[token]]), cache=cache)
    assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))
    assert len(got) == 32 or got[-1] == eos
    if prompt.startswith("def "):  # trained, not random: the body is an indented block
        assert tokenizer.decode(got).startswith("\n    "), tokenizer.decode(got)
