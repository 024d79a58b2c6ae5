"""`python -m mlx_falcon_h1.server`: mlx-lm's OpenAI-compatible server (same flags,
continuous batching, prompt cache) on our Falcon-H1.

Four things differ from mlx-lm's, all about holding up under bad input:
- `GET /v1/models` lists the model being served, and works on a machine with
  no Hugging Face cache folder (mlx-lm's scan raises CacheNotFound there and
  the client gets an empty reply).
- Requests are checked before they reach the generation thread: JSON types
  (a prompt that is not a string, messages that are not role/content objects,
  stop words, logit_bias token ids outside the vocabulary), non-finite
  numbers, a seed MLX cannot take, and max_tokens or a prompt beyond the
  model's context (max_position_embeddings). Each gets a 400 naming the field.
  A prompt that fits leaves its generation capped at the context's end.
- mlx-lm answers every error raised while preparing a request with 404; here
  a rejected prompt is a 400, a failed model load stays 404 and a dead
  generation thread is a 503.
- --kv-bits and --kv-group-size that cannot quantize the model's K/V
  (kv_quantization.py) stop the server at startup, and a request naming such a
  model gets a 400 while the served one stays loaded (FalconModelProvider);
  mlx-lm fails --quantized-kv-start tokens into an answer.

The prompt cache reuses any prefix a request shares with an earlier one
(prompt_cache.py): an edited, regenerated or branched conversation re-reads at
most one checkpoint interval, where mlx-lm's re-reads all of it. Each request's
prompt is read in segments that end at its messages' boundaries and every
--checkpoint-interval tokens, where the state is kept.

And flags more: `--max-kv-size N` (mlx-lm's generate and chat have it, its
server not), bounding every request's attention K/V (cache.py),
`--checkpoint-interval N`, the tokens between checkpoints (0: only at message
boundaries), and `--prompt-cache-dir DIR` (with `--prompt-cache-dir-bytes`), a
folder where entries evicted from the prompt cache are written and reused from,
by this run and the next (prompt_cache_spill.py).

And one default, about who may call it: only pages on this machine and clients
that send no Origin, and requests addressed to this machine (server_access.py;
mlx-lm's lets any web page the user opens call it). Anything else gets a 403
naming the flag that allows it.
"""

import logging
import math
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
from mlx_lm import server as mlx_server
from mlx_lm.models import cache as mlx_lm_cache

from . import server_access
from .cli import read_model_first
from .commands import check_model_kv_quantization, check_window_flags, run_mlx_lm_command
from .loading import load
from .mlx_lm_private import parse_size
from .prompt_cache import DEFAULT_CHECKPOINT_INTERVAL, PromptCache, message_boundaries


# --prompt-cache-dir's bound unless --prompt-cache-dir-bytes sets one: at a 7B's
# shapes an 8K-token conversation spills ~2 GB (its K/V and ~12 checkpoints: one
# every 2048 tokens and 8 others), so about five conversations.
DEFAULT_PROMPT_CACHE_DIR_BYTES = 10 * 10**9


class RequestRejected(ValueError):
    """The request cannot be served as asked (HTTP 400); the message says why."""


def _context_length(model_provider):
    """The served model's context (max_position_embeddings), or None before it loads."""
    args = getattr(getattr(model_provider, "model", None), "args", None)
    return getattr(args, "max_position_embeddings", None)


def _vocab_size(model_provider):
    args = getattr(getattr(model_provider, "model", None), "args", None)
    return getattr(args, "vocab_size", None)


class ServerPromptCache(PromptCache):
    """mlx-lm's server prompt cache (LRUPromptCache's interface) over ours, which
    reuses any shared prefix (prompt_cache.py). FalconResponseGenerator gives it
    the boundaries of each request's messages, its budget and a cache maker."""

    def __init__(self, max_size: int = 10):
        super().__init__(max_entries=max_size)
        self.next_boundaries = ()  # the boundaries of the prompt fetched next

    def fetch_nearest_cache(self, model, tokens):
        boundaries, self.next_boundaries = self.next_boundaries, ()
        return self.fetch(tokens, self.model_identity(model), boundaries)

    def insert_cache(self, model, tokens, prompt_cache, *, cache_type: str = "assistant"):
        # mlx-lm stores a request's cache at the end of each segment of its prompt
        # (types system and user) and once it has answered (assistant): the first are
        # checkpoints of the last, which holds the K/V.
        self.insert(tokens, prompt_cache, self.model_identity(model),
                    keep_kv=cache_type == "assistant")

    @staticmethod
    def model_identity(model_key):
        """mlx-lm's model key (the model's, adapter's and draft model's paths or Hub ids)
        with local paths made absolute: what a spilled entry's file records
        (--prompt-cache-dir), the same whichever folder the server starts in."""
        if not isinstance(model_key, tuple):
            return model_key
        return tuple(str(Path(p).resolve()) if isinstance(p, str) and Path(p).exists() else p
                     for p in model_key)

    def trim_to(self, *, n_sequences=None, n_bytes=None):
        super().trim_to(n_sequences, n_bytes)

    def stats_by_type(self):
        stats = {"entries": {"n_sequences": len(self), "n_bytes": self.nbytes},
                 "checkpoints": {"n_sequences": self.checkpoint_count, "n_bytes": 0}}
        if self.spill is not None:  # on disk: --prompt-cache-dir
            stats["spilled"] = {"n_sequences": len(self.spill), "n_bytes": self.spill.nbytes}
        return stats


class FalconModelProvider(mlx_server.ModelProvider):
    """mlx-lm's model provider; with --kv-bits, a request naming a model whose K/V
    cannot be quantized so is refused (400) before the served model is dropped
    (mlx-lm's _load drops it first), and the server goes on serving it."""

    def _load(self, model_path, adapter_path=None, draft_model_path=None):
        if self.cli_args.kv_bits is not None:
            for path in (model_path, draft_model_path):
                if path is not None:
                    check_model_kv_quantization(path, self.cli_args.kv_bits,
                                                self.cli_args.kv_group_size)
        super()._load(model_path, adapter_path, draft_model_path)


class FalconResponseGenerator(mlx_server.ResponseGenerator):
    """mlx-lm's generation loop; prompts are checked once tokenized (on the
    generation thread, where the tokenizer lives) so that an empty prompt or one
    longer than the context never reaches the model, and split where the prompt
    cache keeps checkpoints (ServerPromptCache)."""

    checkpoint_interval: Optional[int] = DEFAULT_CHECKPOINT_INTERVAL  # --checkpoint-interval
    prompt_cache_dir: Optional[str] = None  # --prompt-cache-dir
    prompt_cache_dir_bytes: Optional[int] = DEFAULT_PROMPT_CACHE_DIR_BYTES  # --prompt-cache-dir-bytes

    def __init__(self, model_provider, prompt_cache):
        prompt_cache.max_bytes = model_provider.cli_args.prompt_cache_bytes
        prompt_cache.checkpoint_interval = self.checkpoint_interval
        prompt_cache.make_cache = self._new_cache
        if self.prompt_cache_dir is not None:
            if mx.distributed.init().size() > 1:
                raise ValueError(
                    "--prompt-cache-dir cannot be used under mlx.launch: each process holds its "
                    "shard of every cache, and a file one process could not use would leave the "
                    "processes at different states")
            prompt_cache.spill_models = self._models_of
            prompt_cache.spill_to(self.prompt_cache_dir, self.prompt_cache_dir_bytes)
        super().__init__(model_provider, prompt_cache)

    def _generate(self):
        store = self.prompt_cache
        super()._generate()  # returns once the server stops
        if store.spill is not None:  # what is in memory too, for the next run
            store.spill_all()

    def _models_of(self, model_key) -> Optional[list]:
        """The models whose caches an entry of this model key holds (the model, then
        the draft model), which its spilled file is checked against; None unless
        they are the ones loaded."""
        provider = self.model_provider
        if provider.model is None or ServerPromptCache.model_identity(provider.model_key) != model_key:
            return None
        return [provider.model] + ([provider.draft_model] if provider.draft_model is not None else [])

    def _new_cache(self) -> list:
        provider = self.model_provider
        cache = mlx_lm_cache.make_prompt_cache(provider.model)
        if provider.draft_model is not None:
            cache += mlx_lm_cache.make_prompt_cache(provider.draft_model)
        return cache

    def _tokenize(self, tokenizer, request, args):
        prompt, segments, kinds, *rest = self._checked_tokens(tokenizer, request, args)
        # Where the state is kept: the sequential path reads the boundaries from the
        # cache fetched next, the batched one stores a checkpoint at each segment end.
        vision = rest[-1]
        boundaries = [] if vision is not None else _message_boundaries(
            tokenizer, request, args, prompt, self.cli_args)
        self.prompt_cache.next_boundaries = boundaries
        cuts = self.prompt_cache.planned(len(prompt), boundaries, every=True)
        segments, kinds = _split_segments(segments, kinds, cuts)
        return (prompt, segments, kinds, *rest)

    def _checked_tokens(self, tokenizer, request, args):
        result = super()._tokenize(tokenizer, request, args)
        prompt = result[0]
        if len(prompt) == 0:
            raise RequestRejected("the prompt is empty: it tokenizes to no tokens")
        context = _context_length(self.model_provider)
        if context is not None and len(prompt) >= context:
            raise RequestRejected(
                f"the prompt has {len(prompt)} tokens; the model's context is {context} tokens "
                "(max_position_embeddings), with room for at least one generated token")
        if context is not None and len(prompt) + args.max_tokens > context:
            # As OpenAI's API does for an unset max_tokens: stop at the context's end
            # (the server's default --max-tokens applies when a client sets none).
            args.max_tokens = context - len(prompt)
        return result


def _message_boundaries(tokenizer, request, args, prompt, cli_args) -> List[int]:
    """Where the request's last messages end in its prompt (prompt_cache.message_boundaries)."""
    if request.request_type != "chat" or not tokenizer.has_chat_template:
        return []
    template_args = dict(cli_args.chat_template_args or {}, **(args.chat_template_kwargs or {}))
    return message_boundaries(tokenizer, request.messages, prompt, tools=request.tools,
                              **template_args)


def _split_segments(segments, kinds, cuts):
    """mlx-lm's segments of a prompt, also split at `cuts` (positions in the prompt).
    Every piece is a system or user segment: the server stores only checkpoints at
    their ends (ServerPromptCache), the whole cache once answered."""
    pieces, piece_kinds, start = [], [], 0
    for segment, kind in zip(segments, kinds):
        end = start + len(segment)
        inside = sorted(c - start for c in cuts if start < c < end)
        for a, b in zip([0, *inside], [*inside, len(segment)]):
            pieces.append(segment[a:b])
            piece_kinds.append("system" if kind == "system" else "user")
        start = end
    return pieces, piece_kinds


class _RecordingGenerator:
    """Stands in for the response generator inside one request handler: records
    the error generate() raised, so that the handler can give it its status."""

    def __init__(self, generator, handler):
        self._generator, self._handler = generator, handler

    def __getattr__(self, name):
        return getattr(self._generator, name)

    def generate(self, *args, **kwargs):
        try:
            return self._generator.generate(*args, **kwargs)
        except Exception as e:
            self._handler._generate_error = e
            raise


def _is_finite_number(value) -> bool:
    return not isinstance(value, (int, float)) or isinstance(value, bool) or math.isfinite(value)


class FalconAPIHandler(mlx_server.APIHandler):
    def __init__(self, response_generator, *args, **kwargs):
        self._generate_error = None
        super().__init__(_RecordingGenerator(response_generator, self), *args, **kwargs)

    # -- who may call ------------------------------------------------------------
    def parse_request(self) -> bool:
        # Every method (do_GET, do_POST, do_OPTIONS and any other) comes through
        # here before it runs: a refused request never reaches one.
        if not super().parse_request():
            return False
        refusal = server_access.refusal(self.headers, self.response_generator.cli_args)
        if refusal is None:
            return True
        self._refuse(refusal)
        return False

    def _refuse(self, message: str) -> None:
        logging.warning(f"403: {message}")  # a page refused by the browser never shows the body
        body = mlx_server.json.dumps({"error": message}).encode()
        self._discard_body()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def _discard_body(self, limit: int = 16 << 20) -> None:
        # Closing a connection with a body still unread resets it, and the client
        # (sending a long chat, say) never sees the 403: read it first, up to
        # `limit` bytes (a client sending more sees the reset).
        try:
            left = min(int(self.headers.get("Content-Length") or 0), limit)
        except ValueError:
            return
        while left > 0:
            chunk = self.rfile.read(min(left, 65536))
            if not chunk:
                return
            left -= len(chunk)

    def _set_cors_headers(self):
        # mlx-lm's, but an Origin is echoed only if allowed (parse_request has
        # already refused the others; this keeps the headers right by themselves).
        allowed = server_access.allowed_origin(self.headers.get("Origin"),
                                               self.response_generator.cli_args)
        if allowed is not None:
            self.send_header("Access-Control-Allow-Origin", allowed)
            if allowed != "*":
                self.send_header("Vary", "Origin")
        self.send_header("Access-Control-Allow-Methods", "*")
        self.send_header("Access-Control-Allow-Headers", "*")

    # -- statuses ------------------------------------------------------------
    def _set_completion_headers(self, status_code: int = 200):
        # mlx-lm sends 404 for any exception from generate(); give each its own.
        error = self._generate_error
        if status_code == 404 and error is not None:
            if isinstance(error, (RequestRejected, ValueError, TypeError, KeyError)):
                status_code = 400
            elif "generation thread died" in str(error):
                status_code = 503
        super()._set_completion_headers(status_code)

    # -- request checks --------------------------------------------------------
    def validate_model_parameters(self) -> None:
        super().validate_model_parameters()
        body = self.body
        for name, value in body.items():
            if not _is_finite_number(value):
                raise ValueError(f"{name} must be a finite number, not {value}")
        if self.path == "/v1/completions":
            if not isinstance(body.get("prompt"), str):
                raise ValueError("prompt must be a string (a completion request needs one)")
        else:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ValueError("messages must be a non-empty list of {role, content} objects")
            for i, m in enumerate(messages):
                if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                        and isinstance(m.get("content", ""), (str, list, type(None)))):
                    raise ValueError(f"messages[{i}] must be an object with a string role and "
                                     "string content")
        stop = body.get("stop")
        if stop is not None and not (isinstance(stop, str) or (
                isinstance(stop, list) and all(isinstance(s, str) for s in stop))):
            raise ValueError("stop must be a string or a list of strings")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be between 0 and 2**63 - 1, not {self.seed}")
        if self.stream_options is not None and not isinstance(self.stream_options, dict):
            raise ValueError("stream_options must be an object")
        provider = self.response_generator.model_provider
        context = _context_length(provider)
        if context is not None and self.max_tokens > context:
            raise ValueError(f"max_tokens must be at most the model's context of {context} tokens "
                             f"(max_position_embeddings), not {self.max_tokens}")
        vocab = _vocab_size(provider)
        if self.logit_bias and vocab is not None:
            bad = [k for k in self.logit_bias if not 0 <= k < vocab]
            if bad:
                raise ValueError(f"logit_bias token ids must be in [0, {vocab}): got {bad[:5]}")

    # -- GET /v1/models ----------------------------------------------------------
    def handle_models_request(self):
        parts = self.path.split("/")
        wanted = "/".join(parts[3:]) or None if len(parts) > 3 else None
        models = []
        served = self.response_generator.cli_args.model
        if served:
            path = Path(served)
            models.append(str(path.resolve()) if path.exists() else served)
        models += [m for m in _hub_cache_models() if m not in models]
        if wanted is not None:
            models = [m for m in models if m == wanted]
        body = mlx_server.json.dumps({"object": "list", "data": [
            {"id": m, "object": "model", "created": self.created} for m in models]}).encode()
        self._set_completion_headers(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()


def _hub_cache_models():
    """Repo ids of Hugging Face cache entries that look like MLX-loadable models
    (a config, a tokenizer config and safetensors on main); [] when there is no
    cache folder or it cannot be read."""
    try:
        from huggingface_hub import scan_cache_dir

        repos = scan_cache_dir().repos
    except Exception:  # CacheNotFound, a permission error: nothing cached to list
        return []
    found = []
    for repo in repos:
        if repo.repo_type != "model" or "main" not in repo.refs:
            continue
        names = {f.file_path.name for f in repo.refs["main"].files}
        if {"config.json", "tokenizer_config.json"} <= names and any(
                n.endswith(".safetensors") for n in names):
            found.append(repo.repo_id)
    return found


def _run_http_server(host, port, response_generator, **kwargs):
    kwargs.setdefault("handler_class", FalconAPIHandler)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (how apps and service managers stop a server) stops it as Ctrl-C
        # does in mlx-lm's loop: the generation thread ends, and the prompt cache
        # goes to --prompt-cache-dir (FalconResponseGenerator._generate).
        signal.signal(signal.SIGTERM, _interrupt)
    return _MLX_RUN_HTTP_SERVER(host, port, response_generator, **kwargs)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


_MLX_RUN_HTTP_SERVER = mlx_server._run_http_server


def _take_flag(argv, flag: str, what: str, parse=int):
    """A flag of ours that mlx-lm's server lacks (--max-kv-size, --checkpoint-interval,
    --prompt-cache-dir): removed from argv before mlx-lm parses it, and its value
    returned, parsed (a number by default)."""
    for i, arg in enumerate(argv):
        if arg == flag or arg.startswith(flag + "="):
            value = arg.partition("=")[2] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if not value or value.startswith("--"):  # the next flag: no value given
                sys.exit(f"error: {flag} needs {what}")
            del argv[i : i + (1 if "=" in arg else 2)]
            try:
                return parse(value)
            except (ValueError, KeyError, ArithmeticError):  # parse_size: a bad unit, not a number
                sys.exit(f"error: {flag} needs {what}, not {value!r}")
    return None


def _with_window(load, max_kv_size: int):
    """The loader, giving every loaded model's caches this attention window."""

    def load_with_window(*args, **kwargs):
        result = load(*args, **kwargs)
        result[0].max_kv_size = max_kv_size  # read by Model.make_cache
        return result

    return load_with_window


def main() -> None:
    read_model_first(sys.argv[1:])
    server_access.default_to_local_origins(sys.argv)
    replace = {}
    max_kv_size = _take_flag(sys.argv, "--max-kv-size", "a number of tokens")
    interval = _take_flag(sys.argv, "--checkpoint-interval", "a number of tokens (0: none)")
    if interval is not None:
        if interval < 0:
            sys.exit(f"error: --checkpoint-interval needs a number of tokens (0: none), not {interval}")
        FalconResponseGenerator.checkpoint_interval = interval or None
    _take_prompt_cache_dir(sys.argv)
    if max_kv_size is not None:
        check_window_flags(sys.argv[1:] + ["--max-kv-size", str(max_kv_size)])
        replace["load"] = _with_window(load, max_kv_size)
    try:
        run_mlx_lm_command("server", ModelProvider=FalconModelProvider,
                           ResponseGenerator=FalconResponseGenerator,
                           LRUPromptCache=ServerPromptCache,
                           _run_http_server=_run_http_server, **replace)
    finally:
        if {"-h", "--help"} & set(sys.argv[1:]):  # mlx-lm's parser printed its flags
            print(OUR_FLAGS_HELP)


def _take_prompt_cache_dir(argv) -> None:
    """--prompt-cache-dir DIR and --prompt-cache-dir-bytes SIZE: the folder, created
    now (a path that cannot be one ends the command in one line), and its bound."""
    folder = _take_flag(argv, "--prompt-cache-dir", "a folder", parse=str)
    bound = _take_flag(argv, "--prompt-cache-dir-bytes", "a size in bytes (10GB, 500M)",
                       parse=parse_size)
    if folder is None:
        if bound is not None:
            sys.exit("error: --prompt-cache-dir-bytes bounds the folder --prompt-cache-dir "
                     "names; give that too")
        return
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --prompt-cache-dir {folder}: {e.strerror or e}")
    FalconResponseGenerator.prompt_cache_dir = folder
    if bound is not None:
        FalconResponseGenerator.prompt_cache_dir_bytes = bound


OUR_FLAGS_HELP = f"""
flags of mlx_falcon_h1.server beyond mlx-lm's:
  --max-kv-size N       bound every request's attention K/V to N tokens (conv and
                        SSM state still carry the whole context)
  --checkpoint-interval N
                        tokens between recurrent-state checkpoints kept while a
                        prompt is read, so an edited or branched conversation
                        re-reads at most N tokens before the edit (default:
                        {DEFAULT_CHECKPOINT_INTERVAL}; 0: only at message boundaries)
  --prompt-cache-dir DIR
                        write prompt-cache entries evicted from memory to DIR, and
                        reuse them from there, in this run and the next (files
                        checked against the model; off by default)
  --prompt-cache-dir-bytes SIZE
                        the most DIR's files take, least recently used deleted
                        first (default: {DEFAULT_PROMPT_CACHE_DIR_BYTES // 10**9}GB)
  --allowed-origins     defaults to web pages on this machine (mlx-lm's: *)
"""


if __name__ == "__main__":
    from .cli import run

    run(main)
