"""mlx-lm's commands (generate, chat, server) running this package's Falcon-H1.

Each keeps mlx-lm's flags and behaviour; only the loader is ours, so the model
(and any draft model) is built by mlx_falcon_h1.load with its checks and our
implementation.
"""

import argparse
import sys
from pathlib import Path
from importlib import import_module
from typing import Optional, Tuple

from . import mlx_lm_patches
from . import prompt_cache_files
from .cache import FalconH1Cache, PromptCacheError
from .kv_quantization import KVQuantizationError, check_kv_quantization
from .loading import load, make_args, read_config, resolve_path, sharded_load

# The small Falcon-H1 trained on Python's standard library that ships with the
# package (examples/train_tiny_falcon_h1.py), 8-bit: the default --model.
DEFAULT_MODEL = Path(__file__).parent / "default_model"


# mlx-lm 0.32.2's commands that take --kv-bits; its chat has none (and says so).
TAKE_KV_BITS = ("generate", "server")


def run_mlx_lm_command(name: str, require_model: bool = True, **replace) -> None:
    """Run `mlx_lm.<name>`'s main() with our loader. Without --model it runs the
    model shipped with the package (require_model: whether a model is needed).

    replace: more of the module's names to swap for ours (the command looks
    them up at call time), e.g. the tuner's helpers for `lora`.
    """
    module = import_module(f"mlx_lm.{name}")
    mlx_lm_patches.install()  # after the import: the command's module takes them too
    flags = " ".join(sys.argv[1:]).replace("=", " ").split()
    if require_model and "--model" not in flags and "--prompt-cache-file" not in flags:
        sys.argv[1:1] = ["--model", str(DEFAULT_MODEL)]
    module.load = load  # mlx-lm's commands look their loader up at call time
    if hasattr(module, "sharded_load"):  # chat and server under mlx.launch
        module.sharded_load = sharded_load
    check_window_flags(sys.argv[1:])
    if name in TAKE_KV_BITS and (kv := check_kv_flags(sys.argv[1:])) is not None:
        # Any other model the command loads (a prompt-cache file's, a server
        # request's) is checked before it loads, so before it generates.
        module.load = checking_kv_quantization(module.load, *kv)
    if name == "generate":
        _check_prompt_cache_files(module, with_draft="--draft-model" in flags)
    for attribute, value in replace.items():
        setattr(module, attribute, value)
    try:
        module.main()
    except PromptCacheError as e:
        sys.exit(f"error: {e}")


def check_window_flags(argv) -> None:
    """--max-kv-size bounds the attention K/V (cache.py). Its size is checked here,
    and two flags that cannot go with it are refused, where mlx-lm would go on
    without a word: --kv-bits (a rotating K/V cannot be quantized) and
    --draft-model (speculative decoding takes rejected draft tokens back, which a
    full window cannot; mlx-lm drops max_kv_size there)."""
    flags = " ".join(argv).replace("=", " ").split()
    if "--max-kv-size" not in flags:
        return
    value = flags[flags.index("--max-kv-size") + 1 :][:1]
    try:
        FalconH1Cache(max_kv_size=int(value[0]) if value else None)
    except ValueError as e:
        sys.exit(f"error: --max-kv-size {' '.join(value)}: {e}")
    for other, why in (
        ("--kv-bits", "mlx-lm cannot quantize a bounded (rotating) K/V cache"),
        ("--draft-model", "speculative decoding must take rejected tokens back, which a full "
                          "bounded K/V cannot (and mlx-lm would drop --max-kv-size)"),
    ):
        if other in flags:
            sys.exit(f"error: --max-kv-size cannot be combined with {other}: {why}; use one or "
                     "the other")


def check_kv_flags(argv) -> Optional[Tuple[int, int]]:
    """--kv-bits with --kv-group-size: refused (KVQuantizationError), before anything is
    loaded or generated, if --model's or --draft-model's attention K/V cannot be
    quantized so (kv_quantization.py; mlx-lm would fail --quantized-kv-start
    tokens into the answer). Returns (bits, group_size), or None without
    --kv-bits (or with a value mlx-lm's own parser refuses)."""
    if "-h" in argv or "--help" in argv:
        return None  # the command prints its help and stops: nothing is loaded
    parser = _SilentParser(add_help=False)  # these flags only, read as mlx-lm's parser reads them
    for flag in ("--model", "--draft-model", "--kv-bits", "--kv-group-size"):
        parser.add_argument(flag)
    try:
        given = parser.parse_known_args(argv)[0]
        bits = int(given.kv_bits)
        group_size = 64 if given.kv_group_size is None else int(given.kv_group_size)  # mlx-lm's default
    except (TypeError, ValueError):  # absent, or no number: mlx-lm's parser says so
        return None
    for model in (given.model, given.draft_model):
        if model is not None:  # a refusal is a user error: one line, exit 2 (cli.py)
            check_model_kv_quantization(model, bits, group_size)
    return bits, group_size


class _SilentParser(argparse.ArgumentParser):
    """A parser whose errors are left to the command's own (which then reports them)."""

    def error(self, message):
        raise ValueError(message)


def check_model_kv_quantization(model: str, bits: int, group_size: int) -> None:
    """KVQuantizationError, naming the model, unless its K/V (head_dim, from
    config.json: the weights are not read) can be quantized with these."""
    path = resolve_path(model)
    args = make_args(read_config(path), path / "config.json")
    try:
        check_kv_quantization(args.head_dim, bits, group_size)
    except KVQuantizationError as e:
        raise KVQuantizationError(f"{model}: {e}") from None


def checking_kv_quantization(load, bits: int, group_size: int):
    """The loader, refusing (check_model_kv_quantization) a model before loading it."""

    def load_checked(path_or_hf_repo, *args, **kwargs):
        check_model_kv_quantization(path_or_hf_repo, bits, group_size)
        return load(path_or_hf_repo, *args, **kwargs)

    return load_checked


def _check_prompt_cache_files(module, with_draft: bool) -> None:
    """--prompt-cache-file: read it with clear errors (missing, truncated, not a
    prompt cache), and check it against the model once that is loaded, so that a
    cache made for another model or configuration is named as such instead of
    failing deep in a layer. With a draft model the file holds both caches; the
    model's part is checked."""
    loaded = []

    def load_prompt_cache(path, return_metadata=False):
        result = prompt_cache_files.load_prompt_cache(path, return_metadata=return_metadata)
        loaded.append((path, result[0] if return_metadata else result))
        return result

    def load_and_check(*args, **kwargs):
        result = module_load(*args, **kwargs)
        while loaded:
            path, prompt_cache = loaded.pop()
            layers = len(getattr(result[0], "layers", []))
            part = prompt_cache[:layers] if with_draft else prompt_cache
            prompt_cache_files.validate_prompt_cache(result[0], part, source=str(path))
        return result

    module_load = module.load
    module.load_prompt_cache = load_prompt_cache
    module.load = load_and_check
