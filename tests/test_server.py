"""`python -m mlx_falcon_h1.server` answers concurrent requests as it answers each alone."""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlx_lm.generate import generate

from conftest import make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load

PROMPTS = ["def return if else for in while import", "class"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    make_checkpoint(path)
    make_tokenizer(path)
    port = free_port()
    cmd = [sys.executable, "-m", "mlx_falcon_h1.server", "--model", str(path), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stdout.read())
            time.sleep(0.3)
    yield path, port
    proc.terminate()
    proc.wait(timeout=30)


def test_two_concurrent_requests(server):
    path, port = server
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(lambda p: complete(port, p), PROMPTS))
    alone = [complete(port, p) for p in PROMPTS]
    assert together == alone and all(len(t.split()) >= 3 for t in alone), alone
    model, tokenizer = load(str(path))
    for prompt, text in zip(PROMPTS, alone):
        assert text == generate(model, tokenizer, prompt, max_tokens=10)
