"""The server reuses every prefix a chat app's or an agent's next request shares with
what it has seen (prompt_cache.py), on mlx-lm's batched path and its sequential one
(a request with a seed): each request's answer and log-probabilities are those of
reading its prompt cold, and what it re-reads is at most one checkpoint interval
beyond the ideal (the longest prefix it shares with an earlier prompt or answer)."""

import json
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from mlx_lm.generate import generate_step

from mlx_falcon_h1 import load
from mlx_falcon_h1.commands import DEFAULT_MODEL
from mlx_falcon_h1.prompt_cache import common_prefix
from conftest import running_server

INTERVAL = 128
MAX_TOKENS = 6
TEXT = (DEFAULT_MODEL.parent / "model.py").read_text()


@pytest.fixture(scope="module")
def shipped():
    return load(str(DEFAULT_MODEL))


@pytest.fixture(scope="module")
def port():
    # Three conversations' branches at once: no eviction (--prompt-cache-size).
    with running_server("--checkpoint-interval", str(INTERVAL), "--prompt-cache-size", "16") as port:
        yield port


def chat(port, messages, seed):
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0.0, "logprobs": True}
    if seed:
        body["seed"] = 0  # a seed makes mlx-lm serve the request on its sequential path
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                     json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        answer = json.loads(response.read())
    choice = answer["choices"][0]
    tokens = choice["logprobs"]["content"]
    return (choice["message"]["content"], answer["usage"], [t["logprob"] for t in tokens],
            [t["id"] for t in tokens])


def cold(model, tokenizer, prompt):
    """Greedy tokens and their log-probabilities, the prompt read from scratch."""
    out = []
    for (token, logprobs), _ in zip(generate_step(mx_array(prompt), model), range(MAX_TOKENS)):
        out.append(float(logprobs[token]))
        if token in tokenizer.eos_token_ids:
            break
    return out


def mx_array(tokens):
    import mlx.core as mx

    return mx.array(tokens)


def requests_of_a_chat_and_an_agent(salt):
    """Each request as a function of the answers so far: a multi-turn chat,
    regenerate, edit the last and an earlier message, a new chat on the same
    system prompt, an agent's tool outputs and a retried step."""
    system = {"role": "system", "content": f"{salt} You review Python code. " + TEXT[:1500]}
    ask = lambda i, text: {"role": "user", "content": f"Question {i}: " + text}  # noqa: E731
    said = lambda text: {"role": "assistant", "content": text}  # noqa: E731
    tool = lambda text: {"role": "tool", "content": text}  # noqa: E731
    q1, q2 = ask(1, TEXT[1500:2300]), ask(2, TEXT[2300:2700])
    return [
        ("first turn", lambda a: [system, q1]),
        ("regenerate", lambda a: [system, q1]),
        ("next turn", lambda a: [system, q1, said(a[0]), q2]),
        ("edit the last message", lambda a: [system, q1, said(a[0]), ask(2, TEXT[2700:3000])]),
        ("edit an earlier message", lambda a: [system, ask(1, TEXT[1400:2300]), said(a[0]), q2]),
        ("new chat, same system prompt", lambda a: [system, ask(9, TEXT[3000:3300])]),
        ("agent tool output", lambda a: [system, q1, said(a[0]), q2, said(a[2]),
                                         tool(TEXT[3300:4300])]),
        ("agent retry", lambda a: [system, q1, said(a[0]), q2, said(a[2]), tool(TEXT[3300:4300])]),
        ("a pasted document", lambda a: [system, ask(3, TEXT[4300:5300] + "\nWhat does it do?")]),
        ("edit the question under it",
         lambda a: [system, ask(3, TEXT[4300:5300] + "\nWhat does it return?")]),
    ]


def converse(port, tokenizer, salt, sequential):
    """Run the requests of requests_of_a_chat_and_an_agent: per request its name,
    prompt tokens, cached tokens, ideal and answer log-probabilities."""
    answers, seen, record = [], [], []
    for name, messages in requests_of_a_chat_and_an_agent(salt):
        messages = messages(answers)
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        text, usage, logprobs, ids = chat(port, messages, seed=sequential)
        answers.append(text)
        assert usage["prompt_tokens"] == len(prompt)
        ideal = min(max([common_prefix(s, prompt) for s in seen], default=0), len(prompt) - 1)
        record.append((name, prompt, usage["prompt_tokens_details"]["cached_tokens"], ideal, logprobs))
        seen.append(prompt + ids)  # what the server has seen: the prompt and its answer
    return record


def check(record, model, tokenizer):
    for name, prompt, cached, ideal, logprobs in record:
        assert ideal - INTERVAL <= cached <= ideal, (name, cached, ideal)
        if name in ("regenerate", "agent retry"):
            assert cached == len(prompt) - 1, name
        if name == "edit the question under it":  # the tail checkpoints before the end
            assert len(prompt) - cached <= max(4 * (len(prompt) - ideal), 33), (cached, ideal)
        want = cold(model, tokenizer, prompt)
        assert len(logprobs) == len(want) and np.allclose(logprobs, want, rtol=0, atol=1e-4), (
            name, logprobs, want)
    reused, ideal = sum(r[2] for r in record), sum(r[3] for r in record)
    assert reused >= 0.95 * ideal, (reused, ideal)


@pytest.mark.parametrize("path", ["batched", "sequential"])
def test_every_request_shape_reuses_its_shared_prefix_exactly(port, shipped, path):
    model, tokenizer = shipped
    check(converse(port, tokenizer, path, sequential=path == "sequential"), model, tokenizer)


def test_concurrent_conversations_are_each_served_exactly(port, shipped):
    """Three conversations at once, two batched and one sequential, sharing the
    store and its budget: each still gets its cold answers and its reuse."""
    model, tokenizer = shipped
    with ThreadPoolExecutor(3) as pool:
        records = list(pool.map(lambda i: converse(port, tokenizer, f"user {i}", sequential=i == 2),
                                range(3)))
    for record in records:
        check(record, model, tokenizer)


def test_with_a_draft_model(shipped):
    """Speculative decoding takes rejected draft tokens back (checkpoints of them
    are dropped) and the cache list holds the draft's caches too. (--kv-bits: the
    shipped model's head_dim 48 cannot be quantized, and the server refuses it at
    startup, tests/test_kv_bits_flags.py; reuse with quantized K/V:
    tests/test_prompt_cache.py.)"""
    model, tokenizer = shipped
    with running_server("--checkpoint-interval", str(INTERVAL), "--draft-model",
                        str(DEFAULT_MODEL), "--num-draft-tokens", "2") as port:
        check(converse(port, tokenizer, "draft", sequential=False), model, tokenizer)


@pytest.mark.parametrize("value", ["x", "-3"])
def test_a_bad_interval_is_refused_in_one_line(value):
    done = subprocess.run([sys.executable, "-m", "mlx_falcon_h1.server", "--checkpoint-interval",
                           value], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and done.stderr.strip().splitlines() == [
        f"error: --checkpoint-interval needs a number of tokens (0: none), not {value!r}"
        if value == "x" else
        f"error: --checkpoint-interval needs a number of tokens (0: none), not {value}"]


def test_help_lists_our_flags_after_mlx_lms():
    done = subprocess.run([sys.executable, "-m", "mlx_falcon_h1.server", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--prompt-cache-bytes" in done.stdout and "--checkpoint-interval N" in done.stdout
    assert "--prompt-cache-dir DIR" in done.stdout and "--prompt-cache-dir-bytes SIZE" in done.stdout
