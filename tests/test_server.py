"""`python -m mlx_falcon_h1.server`: concurrent requests answered as each alone, the
model list on a machine without a Hugging Face cache, bad requests refused with a
400 naming the field. (examples/load_test.py puts it under load: test_load_test.py.)"""

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlx_lm.generate import generate

from conftest import make_checkpoint, make_tokenizer, running_server
from mlx_falcon_h1 import load

PROMPTS = ["def return if else for in while import", "class"]


def complete(port, prompt):
    body = json.dumps({"prompt": prompt, "max_tokens": 10, "temperature": 0.0}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["choices"][0]["text"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("srv")
    make_checkpoint(path, max_position_embeddings=256)  # a short context: cheap to fill
    make_tokenizer(path)
    # A fresh machine: no Hugging Face cache folder (mlx-lm's /v1/models failed there).
    env = dict(os.environ, HF_HOME=str(tmp_path_factory.mktemp("no_hf_home") / "absent"))
    env.pop("HF_HUB_CACHE", None)
    with running_server("--model", str(path), env=env) as port:
        yield path, port


def test_two_concurrent_requests(server):
    path, port = server
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda p: complete(port, p), PROMPTS))
    alone = [complete(port, p) for p in PROMPTS]
    assert together == alone and all(len(t.split()) >= 3 for t in alone), alone
    model, tokenizer = load(str(path))
    for prompt, text in zip(PROMPTS, alone):
        assert text == generate(model, tokenizer, prompt, max_tokens=10)


def post(port, path, body):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data,
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_models_lists_the_served_model_without_a_hugging_face_cache(server):
    path, port = server
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as response:
        assert response.status == 200
        body = json.loads(response.read())
    assert [m["id"] for m in body["data"]] == [str(path.resolve())]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models/elsewhere", timeout=30) as r:
        assert json.loads(r.read())["data"] == []


@pytest.mark.parametrize("path,body,field", [
    ("/v1/completions", {"prompt": 5, "max_tokens": 4}, "prompt must be a string"),
    ("/v1/completions", {"prompt": "class", "max_tokens": 10**9}, "max_tokens must be at most"),
    ("/v1/completions", {"prompt": "class " * 300, "max_tokens": 4}, "the model's context is 256"),
    ("/v1/completions", {"prompt": "class", "max_tokens": 4, "logit_bias": {"500": 1.0}},
     "logit_bias token ids"),
    ("/v1/completions", b'{"prompt": "class", "max_tokens": 4, "temperature": NaN}',
     "temperature must be a finite number"),
    ("/v1/completions", {"prompt": "class", "max_tokens": 4, "seed": 2**70}, "seed must be"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}], "max_tokens": 4}, "messages[0]"),
], ids=["prompt-type", "max-tokens", "long-prompt", "logit-bias", "nan", "seed", "message"])
def test_bad_requests_get_400_naming_the_field(server, path, body, field):
    _, port = server
    status, answer = post(port, path, body)
    assert status == 400 and field in answer["error"], (status, answer)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as response:
        assert json.loads(response.read())["status"] == "ok"


def test_prompt_cache_exact_hit_leaves_one_token_to_read(tmp_path):
    """An exact prompt-cache hit used to hand mlx-lm's batch generator an empty
    prompt, which killed the server's generation thread (found by
    examples/load_test.py). Now it restores the state before the last token (a
    checkpoint kept while reading), which batching can merge."""
    import mlx.core as mx

    from mlx_falcon_h1 import load_model
    from mlx_falcon_h1.cache import FalconH1Cache
    from mlx_falcon_h1.server import ServerPromptCache

    make_checkpoint(tmp_path)
    model = load_model(tmp_path)[0]
    tokens = [5, 17, 3, 9, 40, 2, 11]
    store = ServerPromptCache(max_size=4)
    store.make_cache = model.make_cache
    cache, rest = store.fetch_nearest_cache("m", tokens)
    assert rest == tokens
    mx.eval(model(mx.array([tokens[:-1]]), cache=cache))  # as mlx-lm reads a prompt
    mx.eval(model(mx.array([tokens[-1:]]), cache=cache))
    store.insert_cache("m", tokens, cache)
    hit, rest = store.fetch_nearest_cache("m", tokens)
    assert rest == tokens[-1:] and hit[0].offset == len(tokens) - 1
    FalconH1Cache.merge([hit[0], model.make_cache()[0]])  # no replay pending
    hit, rest = store.fetch_nearest_cache("m", tokens + [8, 9])  # a longer prompt uses the end
    assert rest == [8, 9]


def test_generation_stops_at_the_context_end(server):
    """A prompt that fits, with max_tokens past the context: capped, not refused."""
    _, port = server
    status, answer = post(port, "/v1/completions", {"prompt": "class " * 250, "max_tokens": 50,
                                                     "temperature": 0.0})
    assert status == 200, answer
    usage = answer["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= 256
    assert usage["completion_tokens"] >= 1
