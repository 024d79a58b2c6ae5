"""`python -m mlx_falcon_h1.benchmark --chat-reuse`: how much of each chat request
a server's prompt cache spares it, against what it could spare.

Starts our server and stock `mlx_lm.server` on the same folder (each on a free
local port, both up for the whole run) and drives each, as a chat app and an
agent would, through one script (`script`): turns of a chat, regenerating the
last answer, editing the last and an earlier user message, a new chat with the
same system prompt, and an agent loop that appends tool output and retries a
step. The assistant messages sent back are each server's own (greedy) answers.
The servers take the requests in turn, one request in flight at a time (which
server goes first alternates step by step, so drift in the machine's load hits
both alike).

For every request it records the prompt tokens and the cached tokens the server
reports (`usage.prompt_tokens_details.cached_tokens`), the ideal (the longest
prefix the prompt shares with a token sequence the server has seen: an earlier
prompt, or an earlier prompt followed by its answer's tokens; computed here with
the folder's tokenizer), the ideal capped at prompt - 1 (a server must read the
last token to give logits), and the time to the first streamed content. At the
end the last request of each shape is sent again with its first message changed
(a prompt no cache can match): its cold time to first token. It speaks only
HTTP to the servers, so it measures any server that takes mlx-lm's flags.

The ideal needs the tokens each server generated, and a stream carries text.
By default every answer is forced (logit_bias) to one token repeated, chosen so
that its streamed text goes back into the next prompt as the same tokens: the
ideal is then exact and both servers get the same prompts. `--answers model`
keeps the model's own answers and reads their tokens back from the text
(`generated_tokens`; mlx-lm streams an answer without its first token's leading
space, so that is sometimes a guess, and each record says which). Random weights
(`--shape`, e.g. 0.5B with `--layers 2`, for long contexts; the shipped model's
tokenizer) answer random tokens, so there answers are always forced.
"""

import argparse
import http.client
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

SHIPPED_MODEL = Path(__file__).parent / "default_model"
DATA = Path(__file__).parent / "data"

# ChatML, as Falcon-H1's instruct models mark roles (their template adds tool
# calls and thinking); the shipped folder's own template only concatenates the
# contents (see --chat-template).
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # fmt: skip

# The shape of each request `script` makes, in order.
SCRIPT = ("first-turn", "chat-turn", "chat-turn", "regenerate", "edit-last", "edit-earlier", "chat-turn",
          "new-chat", "agent-start", "tool-output", "retry", "tool-output")  # fmt: skip

# Share of --context-tokens each text takes. The chat's third turn and the
# agent's last step each reach the whole (contents 1.0, plus the answers).
SIZES = dict(system=0.25, doc1=0.3, doc2=0.25, doc3=0.2, doc4=0.05, doc5=0.1,
             agent_system=0.2, task_doc=0.05, tool1=0.35, tool2=0.4)  # fmt: skip

QUESTIONS = dict(
    q1="Which function above is the hardest to test, and why?",
    q2="Summarise what this code does in two sentences.",
    q2_edited="Summarise what this code does in one sentence, for a changelog.",
    q3="Is there a bug in the code above? Point to the line.",
    q3_edited="Is there a bug in the code above? Point to the line and suggest a fix.",
    q4="Now write a unit test for it.",
    q5="Where in this file is the error handling?",
    task="Find why the test suite fails on Python 3.12 and fix it.",
)


# -- the text ---------------------------------------------------------------------
class TextPool:
    """Document text: the Python standard-library source shipped in data/ (about
    100K tokens of the shipped tokenizer), handed out in order, line by line, so
    no two documents of a run share text; once used up it starts over. Each
    document starts at an unindented line, as a pasted file does: a message that
    starts with spaces would merge them with the newline before it, which moves
    where the template's tokens end."""

    def __init__(self, tokenizer):
        text = (DATA / "heldout.txt").read_text() + "\n" + (DATA / "calibration.txt").read_text()
        self.lines = text.splitlines(keepends=True)
        self.counts = [len(tokenizer.encode(line, add_special_tokens=False)) for line in self.lines]
        self.position = 0

    def take(self, tokens: int) -> str:
        """Whole lines, about `tokens` tokens of them (at least one line)."""
        out, got = [], 0
        while not self.lines[self.position % len(self.lines)][:1].strip():
            self.position += 1
        while got < tokens or not out:
            i = self.position % len(self.lines)
            out.append(self.lines[i])
            got += self.counts[i]
            self.position += 1
        return "".join(out).strip("\n")


def script_texts(pool: TextPool, context_tokens: int) -> dict:
    """The script's texts at this scale: documents of SIZES x context_tokens and
    QUESTIONS."""
    docs = {name: pool.take(max(1, int(share * context_tokens))) for name, share in SIZES.items()}
    return dict(
        system="You are a careful reviewer of Python code. Answer briefly. The project's code, for "
               "reference:\n\n" + docs["system"],
        agent_system="You are a coding agent. Call a tool, read its output, then act. The tools' "
                     "documentation:\n\n" + docs["agent_system"],
        **{k: docs[k] for k in ("doc1", "doc2", "doc3", "doc4", "doc5", "task_doc", "tool1", "tool2")},
        **QUESTIONS,
    )  # fmt: skip


def _user(doc: str, question: str) -> dict:
    # A pasted document, then the question: editing the question keeps the document.
    return {"role": "user", "content": f"{doc}\n\nQuestion: {question}"}


def _assistant(answer: str) -> dict:
    return {"role": "assistant", "content": answer}


def script(t: dict) -> Iterator[Tuple[str, List[dict]]]:
    """The requests of a chat app and an agent: yields (shape, messages) and is
    sent each request's answer (the assistant message the client appends)."""
    system = {"role": "system", "content": t["system"]}
    u1, u2, u3 = _user(t["doc1"], t["q1"]), _user(t["doc2"], t["q2"]), _user(t["doc3"], t["q3"])
    a1 = yield "first-turn", [system, u1]
    a2 = yield "chat-turn", [system, u1, _assistant(a1), u2]
    turn3 = [system, u1, _assistant(a1), u2, _assistant(a2), u3]
    yield "chat-turn", turn3
    yield "regenerate", list(turn3)  # the same messages again
    yield "edit-last", turn3[:-1] + [_user(t["doc3"], t["q3_edited"])]
    branch = [system, u1, _assistant(a1), _user(t["doc2"], t["q2_edited"])]  # turn3[3] edited, the rest dropped
    b = yield "edit-earlier", branch
    yield "chat-turn", branch + [_assistant(b), _user(t["doc4"], t["q4"])]
    yield "new-chat", [system, _user(t["doc5"], t["q5"])]

    agent = [{"role": "system", "content": t["agent_system"]}, _user(t["task_doc"], t["task"])]
    a = yield "agent-start", list(agent)
    agent += [_assistant(a), {"role": "tool", "content": t["tool1"]}]
    yield "tool-output", list(agent)
    a = yield "retry", list(agent)  # the client retries the step: the retry's answer goes on
    agent += [_assistant(a), {"role": "tool", "content": t["tool2"]}]
    yield "tool-output", list(agent)


def cold_variant(messages: List[dict], n: int) -> List[dict]:
    """The same messages, the first one's text changed at its start: a prompt
    that shares no more than the template's first tokens with any other."""
    first = dict(messages[0], content=f"[session {n}] " + messages[0]["content"])
    return [first] + messages[1:]


# -- the ideal ---------------------------------------------------------------------
def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def ideal_prefix(prompt: Sequence[int], seen: Sequence[Sequence[int]]) -> int:
    """The longest prefix of `prompt` that a server which kept every state it
    computed could skip: the longest shared with any sequence in `seen` (earlier
    prompts, and earlier prompts followed by their answers' tokens)."""
    return max((common_prefix(prompt, s) for s in seen), default=0)


# -- servers and requests ----------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent():  # Linux: a server outlives no driver, even one killed with SIGKILL
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# Stock mlx-lm's server with this package's two process settings on Linux
# (blas.py, allocator.py; nothing of mlx-lm is patched), as the benchmark's mlx-lm
# column runs: a bare `python -m mlx_lm.server` multiplies with the mlx[cpu] wheel's
# reference BLAS there, 20-40x slower (--stock-as-installed measures that).
STOCK_WITH_OUR_SETTINGS = ["-c", "import mlx_falcon_h1, runpy; runpy.run_module('mlx_lm.server', "
                                 "run_name='__main__', alter_sys=True)"]  # fmt: skip
OURS = ["-m", "mlx_falcon_h1.server"]
STOCK = ["-m", "mlx_lm.server"]


def start_server(name: str, launch: List[str], model: Path, args: List[str], stack: ExitStack,
                 timeout: float = 600) -> dict:
    """`python <launch> --model model --port P args...` with its output in a log
    file, stopped when `stack` closes; waits for GET /health. Returns its port,
    pid, command and log path."""
    port = free_port()
    cmd = [sys.executable, *launch, "--model", str(model), "--port", str(port), *args]
    env = dict(os.environ, HF_HOME=tempfile.mkdtemp(prefix="chat_reuse_hf_home_"))  # nothing cached
    env.pop("HF_HUB_CACHE", None)
    log = tempfile.NamedTemporaryFile("w", prefix=f"chat_reuse_{name}_", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
    stack.callback(_stop, proc)
    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name}'s server exited with status {proc.returncode}:\n"
                               f"{Path(log.name).read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"{name}'s server did not answer /health within {timeout:.0f} s (log: {log.name})")
        time.sleep(0.3)
    command = shlex.join(cmd[1:]).replace(shlex.quote(str(model)), shlex.quote(shown_path(model)))
    if "--chat-template" in args:  # recorded once, in the result's chat_template
        command = command.replace(shlex.quote(args[args.index("--chat-template") + 1]), "CHAT_TEMPLATE")
    return {"port": port, "pid": proc.pid, "command": command, "log": log.name}


def _stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chat_request(port: int, messages: List[dict], max_tokens: int, logit_bias: Optional[dict] = None,
                 timeout: float = 3600) -> dict:
    """One streaming, greedy chat completion. Returns the answer, finish_reason,
    usage, the time from sending to the first content chunk (ttft_s; to the
    first chunk of any kind if no content came) and to the end (total_s)."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    if logit_bias:
        body["logit_bias"] = logit_bias
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
        text, usage, finish, first_content, first_any = [], None, None, None, None
        while True:
            line = response.readline()
            if not line:
                break
            line = line.decode().strip()
            if not line.startswith("data: "):  # blank lines, ": keepalive n/m" while it reads the prompt
                continue
            if line == "data: [DONE]":
                break
            chunk = json.loads(line[6:])
            first_any = first_any or time.perf_counter()
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first_content = first_content or time.perf_counter()
                    text.append(content)
                finish = choice.get("finish_reason") or finish
        end = time.perf_counter()
    finally:
        conn.close()
    if usage is None:
        raise RuntimeError("the stream carried no usage (stream_options.include_usage)")
    return {"answer": "".join(text), "finish_reason": finish, "usage": usage,
            "ttft_s": (first_content or first_any or end) - start, "total_s": end - start}  # fmt: skip


# -- what the server generated ---------------------------------------------------------------
def streamed_text(tokenizer, tokens: Sequence[int]) -> str:
    """The text a server streams for these generated tokens (mlx-lm's detokenizer)."""
    detokenizer = tokenizer.detokenizer
    for t in tokens:
        detokenizer.add_token(t)
    detokenizer.finalize()
    return detokenizer.text


def forced_answer_token(tokenizer, texts: dict, max_tokens: int) -> int:
    """The first token (by id) whose answer, `max_tokens` of it streamed, comes
    back in the script's next prompt as the same tokens (a word that merges
    neither with itself nor with the template after it, nor loses a leading space)."""
    _, messages = next(script(texts))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    special = set(tokenizer.all_special_ids) | set(tokenizer.eos_token_ids)
    for token in range(len(tokenizer.vocab)):
        if token in special:
            continue
        answer = [token] * max_tokens
        text = streamed_text(tokenizer, answer)
        if not text.strip() or "\ufffd" in text:
            continue
        gen = script(texts)
        next(gen)
        _, following = gen.send(text)
        again = tokenizer.apply_chat_template(following, add_generation_prompt=True, tokenize=True)
        if again[: len(prompt) + max_tokens] == prompt + answer:
            return token
    raise ValueError("no token of this tokenizer streams as text that encodes back to it")


def generated_tokens(tokenizer, text: str, completion_tokens: int, finish_reason: Optional[str]
                     ) -> Tuple[List[int], str]:
    """The tokens a server generated for an answer it streamed as `text`: the text
    re-encoded, or re-encoded after a leading space (mlx-lm's BPE detokenizer
    drops the first token's), whichever streams back as `text` in
    `completion_tokens` tokens, then the stop token if it stopped on one. Returns
    (tokens, how): "exact" if one reading fits, "ambiguous" if both do (the
    re-encoding is taken), "guess" if none does."""
    stop = [min(tokenizer.eos_token_ids)] if finish_reason == "stop" and tokenizer.eos_token_ids else []
    readings = [tokenizer.encode(text, add_special_tokens=False)]
    if text and not text.startswith(" "):
        readings.append(tokenizer.encode(" " + text, add_special_tokens=False))
    fits = [r for r in readings if len(r) + len(stop) == completion_tokens and streamed_text(tokenizer, r) == text]
    how = {0: "guess", 1: "exact"}.get(len(fits), "ambiguous")
    return (fits or readings)[0] + stop, how


# -- the run -----------------------------------------------------------------------------
class Client:
    """One server's side of the run: its script, what it has seen, its records."""

    def __init__(self, name: str, server: dict, texts: dict, tokenizer, max_tokens: int,
                 forced_token: Optional[int]):
        self.name, self.server, self.tokenizer = name, server, tokenizer
        self.max_tokens, self.forced_token = max_tokens, forced_token
        self.logit_bias = None if forced_token is None else {str(forced_token): 100.0}
        self.script = script(texts)
        self.seen: List[List[int]] = []
        self.records: List[dict] = []
        self.last_of_shape: Dict[str, Tuple[List[dict], dict]] = {}

    def send(self, shape: str, messages: List[dict], kind: str = "script") -> dict:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ideal = ideal_prefix(prompt, self.seen)
        got = chat_request(self.server["port"], messages, self.max_tokens, self.logit_bias)
        usage = got["usage"]
        if self.forced_token is not None:
            answer_ids, how = [self.forced_token] * usage["completion_tokens"], "forced"
        else:
            answer_ids, how = generated_tokens(self.tokenizer, got["answer"], usage["completion_tokens"],
                                               got["finish_reason"])  # fmt: skip
        self.seen.append(prompt + answer_ids)  # the prompt itself is its prefix
        prompt_tokens = usage["prompt_tokens"]
        record = {
            "kind": kind, "shape": shape, "messages": len(messages),
            "prompt_tokens": prompt_tokens, "client_prompt_tokens": len(prompt),
            "cached_tokens": (usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
            "ideal": ideal, "ideal_capped": min(ideal, prompt_tokens - 1),
            "ttft_s": got["ttft_s"], "total_s": got["total_s"],
            "completion_tokens": usage["completion_tokens"], "answer_tokens": how,
            "finish_reason": got["finish_reason"],
        }  # fmt: skip
        if record["cached_tokens"] is not None:
            record["beyond_ideal"] = record["ideal_capped"] - record["cached_tokens"]
        self.records.append(record)
        if kind == "script":
            self.last_of_shape[shape] = (messages, record)
        return {**record, "answer": got["answer"]}


def progress(client: Client, record: dict, step: str) -> None:
    cached = record["cached_tokens"]
    print(f"  {client.name:6s} {step:>5s} {record['kind']:6s} {record['shape']:12s} prompt {record['prompt_tokens']:6d}"
          f"  cached {cached if cached is not None else '-':>6}  ideal {record['ideal_capped']:6d}"
          f"  TTFT {record['ttft_s']:7.3f} s  total {record['total_s']:7.3f} s",
          file=sys.stderr, flush=True)  # fmt: skip


def run(model: Path, servers: Dict[str, Tuple[List[str], List[str]]], context_tokens: int, max_tokens: int,
        chat_template: Optional[str], forced_answers: bool = True, cold: bool = True) -> dict:
    """Drive each of `servers` ({name: (python's arguments to start it, its flags)}) through the script on
    `model`; returns the records, per-shape summaries and the run's settings."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(model, {"chat_template": chat_template} if chat_template else {})
    if not tokenizer.has_chat_template:
        raise ValueError(f"{model} has no chat template: pass --chat-template chatml")
    config = json.loads((model / "config.json").read_text())
    pool = TextPool(tokenizer)
    texts, longest = sized_texts(pool, tokenizer, context_tokens, max_tokens)
    context = config.get("max_position_embeddings")
    if context is not None and longest + max_tokens + 16 > context:
        raise ValueError(f"--context-tokens {context_tokens} makes prompts of {longest} tokens; this model's "
                         f"context is {context} (max_position_embeddings): ask for fewer, or run a random "
                         "model of a released shape (--shape 0.5B --layers 2)")
    warmup = [{"role": "user", "content": pool.take(300)}]  # each server's first call pays set-up costs
    forced = forced_answer_token(tokenizer, texts, max_tokens) if forced_answers else None
    template_flags = ["--chat-template", chat_template] if chat_template else []

    load_before = os.getloadavg()
    started = time.perf_counter()
    with ExitStack() as stack:
        clients = []
        for name, (launch, flags) in servers.items():
            print(f"Starting {name}'s server ...", file=sys.stderr, flush=True)
            server = start_server(name, launch, model, template_flags + flags, stack)
            clients.append(Client(name, server, texts, tokenizer, max_tokens, forced))
        print(f"Warming up, then {len(SCRIPT)} requests per server, alternating "
              f"(a line per request; ideal: capped at prompt - 1)", file=sys.stderr, flush=True)  # fmt: skip
        for c in clients:
            progress(c, c.send("warmup", warmup, kind="warmup"), "-")
        pending = {c.name: next(c.script) for c in clients}
        step = 0
        while pending:
            step += 1
            order = clients if step % 2 else clients[::-1]
            for c in order:
                if c.name not in pending:
                    continue
                shape, messages = pending[c.name]
                got = c.send(shape, messages)
                progress(c, got, str(step))
                try:
                    pending[c.name] = c.script.send(got["answer"])
                except StopIteration:
                    del pending[c.name]
        if cold:
            for n, shape in enumerate(_shapes_in_order(clients[0])):
                for c in clients if n % 2 else clients[::-1]:
                    messages, record = c.last_of_shape[shape]
                    got = c.send(shape, cold_variant(messages, n), kind="cold")
                    record["cold_ttft_s"], record["cold_prompt_tokens"] = got["ttft_s"], got["prompt_tokens"]
                    progress(c, got, "cold")
    elapsed = time.perf_counter() - started
    return {
        "what": "prompt-cache reuse on a chat app's and an agent's requests (mlx_falcon_h1/chat_reuse.py)",
        "model": shown_path(model), "model_type": config.get("model_type"), "layers": config.get("num_hidden_layers"),
        "max_position_embeddings": config.get("max_position_embeddings"),
        "context_tokens": context_tokens, "max_tokens": max_tokens,
        "chat_template": chat_template or "the folder's",
        "answers": "model" if forced is None else f"forced to token {forced} {tokenizer.decode([forced])!r}",
        "order": "alternating, one request in flight; first server alternates by step",
        "servers": {c.name: c.server for c in clients},
        **_versions(), "loadavg_before_after": [load_before, os.getloadavg()], "elapsed_s": elapsed,
        "summary": {c.name: summarise(c.records) for c in clients},
        "records": {c.name: c.records for c in clients},
    }  # fmt: skip


def shown_path(path: Path) -> str:
    """A path as a record shows it: from the checkout, or from ~, not from this machine's root."""
    path = Path(path).resolve()
    for base, shown in ((Path(__file__).resolve().parents[1], ""), (Path.home().resolve(), "~/")):
        if path.is_relative_to(base):
            return shown + str(path.relative_to(base))
    return str(path)


def _shapes_in_order(client: Client) -> List[str]:
    return list(dict.fromkeys(r["shape"] for r in client.records if r["kind"] == "script"))


def script_prompts(texts: dict, tokenizer, answer: str) -> List[List[int]]:
    """Every prompt of the script, each answer being `answer`."""
    prompts, gen = [], script(texts)
    request = next(gen)
    while True:
        prompts.append(tokenizer.apply_chat_template(request[1], add_generation_prompt=True, tokenize=True))
        try:
            request = gen.send(answer)
        except StopIteration:
            return prompts


def sized_texts(pool: TextPool, tokenizer, context_tokens: int, max_tokens: int) -> Tuple[dict, int]:
    """The script's texts, scaled until its longest prompt reaches context_tokens
    (documents are sized by their lines' token counts, which overstate the joined
    text: a line's newline merges with the next one's indentation). Returns them
    and that longest prompt's length."""
    scale = context_tokens
    for _ in range(4):
        pool.position = 0
        texts = script_texts(pool, scale)
        longest = max(map(len, script_prompts(texts, tokenizer, " x" * max_tokens)))
        if longest >= context_tokens:
            break
        scale = scale * context_tokens // longest + 1
    return texts, longest


def _versions() -> dict:
    import importlib.metadata

    import mlx.core as mx
    import mlx_lm

    try:
        ours = importlib.metadata.version("mlx-falcon-h1")
    except importlib.metadata.PackageNotFoundError:
        ours = None
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except OSError:
        commit = None
    from . import allocator, blas

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "mlx_falcon_h1": ours, "commit": commit,
            "device": f"{mx.default_device()} ({platform.machine()}, {platform.system()})",
            "cpus": os.cpu_count(),
            # This process's; each server that imports the package makes the same choice.
            "blas": blas.in_use, "malloc": allocator.in_use}  # fmt: skip


# -- the summary ------------------------------------------------------------------------
def summarise(records: List[dict]) -> dict:
    """Per shape (in script order) and overall: requests, mean prompt tokens,
    cached / ideal (capped) summed, the most tokens re-read beyond the ideal,
    mean TTFT, the cold TTFT of the shape's last request and its TTFT / cold."""
    script_records = [r for r in records if r["kind"] == "script"]
    groups = {}
    for r in script_records:
        groups.setdefault(r["shape"], []).append(r)
    groups["all"] = script_records
    out = {}
    for shape, rs in groups.items():
        ideal = sum(r["ideal_capped"] for r in rs)
        reported = all(r["cached_tokens"] is not None for r in rs)
        cached = sum(r["cached_tokens"] for r in rs) if reported else None
        colds = [r for r in rs if "cold_ttft_s" in r]
        out[shape] = {
            "requests": len(rs),
            "prompt_tokens": sum(r["prompt_tokens"] for r in rs) / len(rs),
            "ideal_capped": ideal, "cached": cached,
            "cached_over_ideal": cached / ideal if reported and ideal else None,
            "reread_beyond_ideal_max": max(r["beyond_ideal"] for r in rs) if reported else None,
            "reread_beyond_ideal_sum": sum(r["beyond_ideal"] for r in rs) if reported else None,
            "prompt_tokens_read": sum(r["prompt_tokens"] - r["cached_tokens"] for r in rs) if reported else None,
            "ttft_s": sum(r["ttft_s"] for r in rs) / len(rs),
            "cold_ttft_s": colds[-1]["cold_ttft_s"] if colds and shape != "all" else None,
            "ttft_over_cold": colds[-1]["ttft_s"] / colds[-1]["cold_ttft_s"] if colds and shape != "all" else None,
        }  # fmt: skip
    return out


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(result: dict) -> None:
    names = list(result["summary"])
    print(f"chat reuse: {result['model']} ({result['layers']} layers), context {result['context_tokens']} tokens, "
          f"{result['max_tokens']} tokens per answer ({result['answers']}), "
          f"chat template {'ChatML' if result['chat_template'] == CHATML else result['chat_template']}; "
          f"mlx {result['mlx']}, mlx-lm {result['mlx_lm']}, {result['device']}")  # fmt: skip
    columns = [("cached/ideal", "cached_over_ideal", ".2f"), ("beyond ideal max", "reread_beyond_ideal_max", "d"),
               ("TTFT s", "ttft_s", ".3f"), ("cold TTFT s", "cold_ttft_s", ".3f"),
               ("TTFT/cold", "ttft_over_cold", ".2f")]  # fmt: skip
    first = result["summary"][names[0]]
    header = ["shape", "n", "prompt", "ideal"] + [f"{title} {n}" for title, _, _ in columns for n in names]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for shape, row in first.items():
        cells = [shape, str(row["requests"]), f"{row['prompt_tokens']:.0f}", str(row["ideal_capped"])]
        for _, key, fmt in columns:
            cells += [_cell(result["summary"][n][shape][key], fmt) for n in names]
        print("| " + " | ".join(cells) + " |")
    print("(prompt: mean tokens, first server's; ideal: summed, capped at prompt - 1; cached/ideal: the server's "
          "cached_tokens summed over the ideal; beyond ideal: ideal - cached, the most in one request; "
          "TTFT: mean; cold: the shape's last request, its first message changed)")  # fmt: skip
    for n in names:
        s = result["summary"][n]["all"]
        print(f"{n}: read {s['prompt_tokens_read']} prompt tokens of {s['prompt_tokens'] * s['requests']:.0f}, "
              f"{s['reread_beyond_ideal_sum']} beyond the ideal; server log {result['servers'][n]['log']}")
    before, after = result["loadavg_before_after"]
    print(f"run {result['elapsed_s']:.0f} s; machine load average before {before[0]:.2f}, after {after[0]:.2f}")


# -- the command ----------------------------------------------------------------------
def random_chat_model(shape: str, layers: Optional[int], cache_dir: Path, make_random_model) -> Path:
    """A random Falcon-H1 of a released shape (benchmark.make_random_model), float32,
    with the shipped model's tokenizer and chat template (its vocabulary of 4096
    fits every released one), for long-context runs."""
    folder = cache_dir / f"chat-random-{shape}{'' if layers is None else f'-{layers}layers'}-float32"
    if not (folder / "config.json").exists():
        print(f"Building a random {shape} model in {folder} ...", file=sys.stderr, flush=True)
        shutil.rmtree(folder, ignore_errors=True)
        make_random_model(shape, folder, "float32", layers)
    config = json.loads((folder / "config.json").read_text())
    vocab = json.loads((SHIPPED_MODEL / "config.json").read_text())["vocab_size"]
    if vocab > config["vocab_size"]:
        raise ValueError(f"the shipped tokenizer's {vocab} tokens do not fit {shape}'s vocabulary of "
                         f"{config['vocab_size']}")
    for name in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(SHIPPED_MODEL / name, folder / name)
    tokenizer_config = json.loads((SHIPPED_MODEL / "tokenizer_config.json").read_text())
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return folder


def main(argv=None, make_random_model=None, shapes=()) -> None:
    """make_random_model, shapes: benchmark.py's (which dispatches here) for --shape."""
    p = argparse.ArgumentParser(prog="python -m mlx_falcon_h1.benchmark --chat-reuse",
                                description="Prompt-cache reuse on a chat app's and an agent's requests: "
                                            "our server against stock mlx_lm.server.")  # fmt: skip
    p.add_argument("--model", default=None, help=f"A folder (default: the shipped model, {SHIPPED_MODEL}).")
    p.add_argument("--shape", choices=list(shapes) or None, default=None,
                   help="Instead of --model: a random model of this released shape with the shipped "
                        "tokenizer, answers forced to one token (for long contexts: 0.5B's is 16K).")
    p.add_argument("--layers", type=int, default=None, help="--shape: this many layers of it.")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mlx_falcon_h1"),
                   help="Where --shape's random models are kept.")
    p.add_argument("--context-tokens", type=int, default=None,
                   help="The conversation reaches at least this many tokens (default 3000; 8192 with --shape).")
    p.add_argument("--max-tokens", type=int, default=16, help="Tokens per answer (greedy).")
    p.add_argument("--chat-template", choices=("chatml", "folder"), default="chatml",
                   help="ChatML (given to both servers with --chat-template) or the folder's own.")
    p.add_argument("--answers", choices=("forced", "model"), default="forced",
                   help="forced: every answer one token repeated (logit_bias), so the ideal is exact and both "
                        "servers get the same prompts; model: the model's own (greedy), their tokens read back "
                        "from the text. --shape forces them.")
    p.add_argument("--no-stock", action="store_true", help="Our server only.")
    p.add_argument("--stock-as-installed", action="store_true",
                   help="Start stock as `python -m mlx_lm.server` (default: after importing this package, "
                        "for its BLAS and malloc settings on Linux; nothing of mlx-lm patched).")
    p.add_argument("--no-cold", action="store_true", help="Skip the cold reads.")
    p.add_argument("--server-args", default="", help='Flags for both servers, e.g. "--prompt-cache-size 20".')
    p.add_argument("--ours-args", default="", help="Flags for our server only.")
    p.add_argument("--json", default=None,
                   help="Where to write the results (default examples/benchmarks/chat_reuse_<model>.json "
                        "in a checkout, else chat_reuse_<model>.json).")  # fmt: skip
    args = p.parse_args(argv)
    if args.shape and args.model:
        p.error("--shape builds a random model; it does not go with --model")
    if args.layers is not None and not args.shape:
        p.error("--layers shapes a random model (--shape)")
    if args.shape:
        model = random_chat_model(args.shape, args.layers, Path(args.cache_dir), make_random_model)
        label = f"{args.shape}{'' if args.layers is None else f'_{args.layers}layers'}_random"
    else:
        model = Path(args.model) if args.model else SHIPPED_MODEL
        label = "shipped_model" if model.resolve() == SHIPPED_MODEL.resolve() else model.resolve().name
    context_tokens = args.context_tokens or (8192 if args.shape else 3000)
    servers = {"ours": (OURS, shlex.split(args.server_args) + shlex.split(args.ours_args))}
    if not args.no_stock:
        servers["stock"] = (STOCK if args.stock_as_installed else STOCK_WITH_OUR_SETTINGS,
                            shlex.split(args.server_args))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the ExitStack: stop the servers
    result = run(model, servers, context_tokens, args.max_tokens,
                 CHATML if args.chat_template == "chatml" else None, args.answers == "forced" or bool(args.shape),
                 cold=not args.no_cold)  # fmt: skip
    argv = sys.argv[1:] if argv is None else argv
    result["command"] = "python -m mlx_falcon_h1.benchmark --chat-reuse " + shlex.join(argv)
    print_table(result)
    out = Path(args.json) if args.json else _default_json(label)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


def _default_json(label: str) -> Path:
    benchmarks = Path(__file__).resolve().parents[1] / "examples" / "benchmarks"
    return (benchmarks if benchmarks.is_dir() else Path.cwd()) / f"chat_reuse_{label}.json"
