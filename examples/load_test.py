"""Load test of `python -m mlx_falcon_h1.server`: many clients, good and bad, at once.

    python examples/load_test.py                          # shipped model, 60 s, 8 clients
    python examples/load_test.py --duration 300 --clients 16 --json load.json
    python examples/load_test.py --model PATH --port 8123

Starts the server (on the shipped model unless --model; with an empty Hugging
Face cache folder, as on a fresh machine), measures each greedy request alone,
then runs `--clients` threads for `--duration` seconds, each picking at random
(seeded) among:
  good:  completions and chat, streaming and not, greedy (checked against the
         answer the same request got alone) and sampled; GET /v1/models, /health
  rude:  clients that disconnect mid-stream, or send half the body they announced
  bad:   malformed JSON, wrong types, absurd values (negative or huge max_tokens,
         empty prompt, a prompt longer than the context, NaN, ...)
It prints a table and writes JSON: requests served, 4xx, 5xx, empty replies and
resets (crashes), bad requests that were accepted, greedy answers that differed
from the lone answer, and the server's resident memory after the warm-up and at
the end, against the prompt cache's bound. Targets: no 5xx, no crash, every bad
request refused with a 4xx, every greedy answer identical, memory growth within
the bound. Exit status 1 if a target is missed.
"""

import argparse
import http.client
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "mlx_falcon_h1" / "default_model"
PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef main():", "class Stack:\n    def push(self, x):",
           "for i in range(10):", "# parse the arguments\nparser = argparse"]
MAX_TOKENS = 24


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid):
    """Resident memory of a process in MB (Linux /proc, else ps)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True)
    return int(out.stdout.strip() or 0) / 1024


def request(port, method, path, body=None, raw=None, timeout=300):
    """(status, body bytes); status None with the exception's name for a reset or an
    empty reply (which is what a crashed handler gives)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    except (http.client.HTTPException, OSError) as e:
        return None, type(e).__name__.encode()
    finally:
        conn.close()


def completion_text(path, status, data, stream):
    if status != 200:
        return None
    if not stream:
        choice = json.loads(data)["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"] or ""
    text = []
    for line in data.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            choice = json.loads(line[6:])["choices"][0]
            text.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(text)


def good_body(kind, prompt, stream, greedy=True):
    body = {"max_tokens": MAX_TOKENS, "stream": stream}
    body.update({"temperature": 0.0} if greedy else {"temperature": 0.9, "top_p": 0.95})
    if kind == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    return "/v1/completions", body


def bad_requests(context):
    """(name, path, body or raw bytes): each must get a 4xx."""
    long_prompt = "x " * (context + 100)
    good = {"prompt": "def f(", "max_tokens": 8}
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    cases = [
        ("malformed JSON", "/v1/completions", b'{"prompt": "def f(", "max_tokens": '),
        ("JSON not an object", "/v1/completions", b'["prompt"]'),
        ("prompt not a string", "/v1/completions", {**good, "prompt": 12345}),
        ("prompt missing", "/v1/completions", {"max_tokens": 8}),
        ("max_tokens a string", "/v1/completions", {**good, "max_tokens": "ten"}),
        ("max_tokens negative", "/v1/completions", {**good, "max_tokens": -5}),
        ("max_tokens huge", "/v1/completions", {**good, "max_tokens": 10**12}),
        ("temperature a string", "/v1/completions", {**good, "temperature": "hot"}),
        ("temperature NaN", "/v1/completions", b'{"prompt": "a", "max_tokens": 4, "temperature": NaN}'),
        ("top_p out of range", "/v1/completions", {**good, "top_p": 7}),
        ("stream not a bool", "/v1/completions", {**good, "stream": "yes"}),
        ("stop not strings", "/v1/completions", {**good, "stop": [1, 2]}),
        ("logit_bias unknown token", "/v1/completions", {**good, "logit_bias": {"99999999": 5}}),
        ("seed too large", "/v1/completions", {**good, "seed": 2**70}),
        ("prompt longer than the context", "/v1/completions", {**good, "prompt": long_prompt}),
        ("messages a string", "/v1/chat/completions", {**chat, "messages": "hi"}),
        ("messages empty", "/v1/chat/completions", {**chat, "messages": []}),
        ("message without role", "/v1/chat/completions", {**chat, "messages": [{"content": "hi"}]}),
        ("unknown path", "/v1/nothing", good),
    ]
    return cases


def edge_requests():
    """(name, path, body): legal but odd; served or refused, never a 5xx or a crash."""
    return [
        ("empty prompt", "/v1/completions", {"prompt": "", "max_tokens": 4, "temperature": 0.0}),
        ("max_tokens 1", "/v1/completions", {"prompt": "def f(", "max_tokens": 1}),
        ("empty chat content", "/v1/chat/completions",
         {"messages": [{"role": "user", "content": ""}], "max_tokens": 4}),
        ("system only", "/v1/chat/completions",
         {"messages": [{"role": "system", "content": "be brief"}], "max_tokens": 4}),
        ("empty stop string", "/v1/completions", {"prompt": "a", "max_tokens": 4, "stop": [""]}),
        ("top_k 0, min_p 1", "/v1/completions", {"prompt": "a", "max_tokens": 4, "top_k": 0,
                                                 "min_p": 1.0}),
        ("unknown fields", "/v1/completions", {"prompt": "a", "max_tokens": 4, "n": 5,
                                               "frobnicate": {"x": [1]}}),
    ]


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {k: 0 for k in ("requests", "served_2xx", "refused_4xx", "server_5xx",
                                      "empty_or_reset", "bad_accepted", "good_refused",
                                      "greedy_checked", "greedy_mismatch", "disconnects")}
        self.examples = {}

    def add(self, key, example=None):
        with self.lock:
            self.counts[key] += 1
            if example is not None and key not in ("served_2xx", "refused_4xx", "greedy_checked"):
                self.examples.setdefault(key, []).append(example)
                del self.examples[key][5:]

    def status(self, status, name):
        self.add("requests")
        if status is None:
            self.add("empty_or_reset", name)
        elif status >= 500:
            self.add("server_5xx", f"{name}: {status}")
        elif status >= 400:
            self.add("refused_4xx")
        else:
            self.add("served_2xx")


def disconnect_mid_stream(port, prompt, tally):
    """Ask for a long stream, read a little, and hang up."""
    body = json.dumps({"prompt": prompt, "max_tokens": 200, "stream": True,
                       "temperature": 0.0}).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
                  + b"Content-Type: application/json\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        s.recv(64)
    tally.add("disconnects")


def short_body(port, tally):
    """Announce a 1000-byte body, send 10 bytes, hang up."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()
                  + b'Content-Length: 1000\r\n\r\n{"prompt":')
    tally.add("disconnects")


def client(port, seed, deadline, alone, bad, edge, tally):
    rng = random.Random(seed)
    while time.time() < deadline:
        r = rng.random()
        try:
            if r < 0.45:  # good greedy: must match the lone answer
                kind, prompt, stream = rng.choice(list(alone))
                path, body = good_body(kind, prompt, stream)
                status, data = request(port, "POST", path, body)
                tally.status(status, f"greedy {kind}")
                if status is not None and status >= 400:
                    tally.add("good_refused", f"greedy {kind}: {status} {data[:200]!r}")
                text = completion_text(path, status, data, stream)
                if text is not None:
                    tally.add("greedy_checked")
                    if text != alone[(kind, prompt, stream)]:
                        tally.add("greedy_mismatch", f"{kind} {prompt!r} stream={stream}: {text!r} "
                                                     f"vs alone {alone[(kind, prompt, stream)]!r}")
            elif r < 0.55:  # good sampled
                path, body = good_body(rng.choice(["text", "chat"]), rng.choice(PROMPTS),
                                       rng.random() < 0.5, greedy=False)
                status, data = request(port, "POST", path, body)
                tally.status(status, "sampled")
                if status is not None and status >= 400:
                    tally.add("good_refused", f"sampled: {status} {data[:200]!r}")
            elif r < 0.60:
                status, data = request(port, "GET", rng.choice(["/v1/models", "/health"]))
                tally.status(status, "GET")
                if status != 200:
                    tally.add("good_refused", f"GET: {status} {data[:200]!r}")
            elif r < 0.70:
                disconnect_mid_stream(port, rng.choice(PROMPTS), tally)
            elif r < 0.72:
                short_body(port, tally)
            elif r < 0.80:  # legal but odd: anything but a 5xx or a crash
                name, path, body = rng.choice(edge)
                status, data = request(port, "POST", path, body)
                tally.status(status, name)
            else:  # bad input: must be refused with a 4xx
                name, path, body = rng.choice(bad)
                raw = body if isinstance(body, bytes) else None
                status, data = request(port, "POST", path, None if raw else body, raw=raw)
                tally.status(status, name)
                if status is not None and status < 400:
                    tally.add("bad_accepted", f"{name}: {status} {data[:120]!r}")
        except OSError as e:  # a rude client's own connection failing
            tally.add("empty_or_reset", f"{type(e).__name__}: {e}")


def start_server(model, port, extra, stock=False):
    env = dict(os.environ, HF_HOME=tempfile.mkdtemp(prefix="empty_hf_home_"))
    env.pop("HF_HUB_CACHE", None)
    module = ["mlx_lm", "server"] if stock else ["mlx_falcon_h1.server"]
    cmd = [sys.executable, "-m", *module, "--model", str(model),
           "--port", str(port), *extra]
    log = tempfile.NamedTemporaryFile("w+", prefix="load_test_server_", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited:\n{Path(log.name).read_text()[-3000:]}")
        status, _ = request(port, "GET", "/health", timeout=5)
        if status == 200:
            return proc, log.name
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 300 s")


def cache_bound_mb(model, prompt_cache_size, tokens):
    """The prompt cache's memory bound: prompt_cache_size sequences of `tokens`
    tokens each (attention K/V per token + the fixed conv and SSM state), float32."""
    c = json.loads((Path(model) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    heads = c["mamba_n_heads"]
    d_ssm = c.get("mamba_d_ssm") or c["mamba_expand"] * c["hidden_size"]
    p = d_ssm // heads
    conv = (d_ssm + 2 * c["mamba_n_groups"] * c["mamba_d_state"]) * (c["mamba_d_conv"] - 1)
    per_layer = 2 * c["num_key_value_heads"] * head_dim * tokens + heads * p * c["mamba_d_state"] + conv
    return prompt_cache_size * c["num_hidden_layers"] * per_layer * 4 / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-cache-size", type=int, default=10, help="the server's flag")
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--stock", action="store_true",
                        help="run stock mlx_lm.server instead, for comparison (a folder it can load)")
    args = parser.parse_args(argv)

    port = args.port or free_port()
    context = json.loads((Path(args.model) / "config.json").read_text()).get(
        "max_position_embeddings", 8192)
    proc, log = start_server(args.model, port, ["--prompt-cache-size", str(args.prompt_cache_size)],
                             stock=args.stock)
    tally = Tally()
    try:
        status, data = request(port, "GET", "/v1/models")
        try:  # stock mlx-lm: 200 and an empty body when there is no Hugging Face cache
            models = json.loads(data)["data"] if status == 200 else []
        except ValueError:
            models = []
        models_ok = status == 200 and len(models) == 1
        # Each greedy request alone, one at a time: the answers under load must match.
        alone = {}
        for kind in ("text", "chat"):
            for prompt in PROMPTS:
                for stream in (False, True):
                    path, body = good_body(kind, prompt, stream)
                    status, data = request(port, "POST", path, body)
                    if status != 200:
                        raise RuntimeError(f"a good request failed alone: {status} {data[:300]!r}")
                    alone[(kind, prompt, stream)] = completion_text(path, status, data, stream)
        rss_start = rss_mb(proc.pid)
        deadline = time.time() + args.duration
        samples = []  # (seconds into the load, RSS MB): does it level off?

        def sample():
            t0 = time.time()
            while time.time() < deadline:
                samples.append((round(time.time() - t0, 1), round(rss_mb(proc.pid), 1)))
                time.sleep(min(5.0, max(args.duration / 24, 0.5)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        bad = bad_requests(context)
        threads = [threading.Thread(target=client, args=(port, args.seed + i, deadline, alone, bad,
                                                         edge_requests(), tally)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(1.0)
        rss_end = rss_mb(proc.pid)
        health, _ = request(port, "GET", "/health")
        alive = proc.poll() is None and health == 200
        exit_code = proc.poll()  # None: still running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()

    import mlx.core as mx

    bound = cache_bound_mb(args.model, args.prompt_cache_size, context)
    # RSS at mid-run: growth after it is what a leak would show (warm-up, MLX's
    # buffer cache and the prompt cache filling up come first).
    later = [r for t, r in samples if t >= args.duration / 2]
    half = later[0] if later else rss_start
    counts = tally.counts
    result = dict(
        server="mlx_lm.server" if args.stock else "mlx_falcon_h1.server",
        model=str(args.model), duration_s=args.duration, clients=args.clients, seed=args.seed,
        mlx=mx.__version__, platform=sys.platform, **counts,
        models_endpoint_ok=models_ok, server_alive_at_end=alive, server_exit_code=exit_code,
        rss_start_mb=round(rss_start, 1), rss_end_mb=round(rss_end, 1),
        rss_growth_mb=round(rss_end - rss_start, 1), prompt_cache_bound_mb=round(bound, 1),
        rss_growth_second_half_mb=round(rss_end - half, 1), rss_samples=samples,
        examples=tally.examples, server_log=log,
    )
    targets = {
        "no 5xx": counts["server_5xx"] == 0,
        "no empty reply or reset": counts["empty_or_reset"] == 0,
        "server alive, /health 200": alive,
        "GET /v1/models lists the model": models_ok,
        "every bad request refused (4xx)": counts["bad_accepted"] == 0,
        "every good request served": counts["good_refused"] == 0,
        "greedy answers identical to alone": counts["greedy_mismatch"] == 0 and counts["greedy_checked"] > 0,
        "memory growth within the prompt cache bound": rss_end - rss_start <= bound,
    }
    result["targets"] = targets
    print(f"load test of {result['server']}: {args.clients} clients x {args.duration:.0f} s "
          f"on {args.model}")
    print("| figure | value |\n|---|---|")
    for key in ("requests", "served_2xx", "refused_4xx", "server_5xx", "empty_or_reset",
                "disconnects", "bad_accepted", "good_refused", "greedy_checked", "greedy_mismatch"):
        print(f"| {key} | {counts[key]} |")
    print(f"| server RSS start / end MB | {rss_start:.1f} / {rss_end:.1f} "
          f"(growth {rss_end - rss_start:+.1f}, {rss_end - half:+.1f} in the second half; "
          f"prompt-cache bound {bound:.1f}) |")
    for name, ok in targets.items():
        print(f"{'ok  ' if ok else 'MISS'} {name}")
    for key, examples in tally.examples.items():
        print(f"{key}: {examples}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
