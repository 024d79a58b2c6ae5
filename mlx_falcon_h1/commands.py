"""mlx-lm's commands (generate, chat, server) running this package's Falcon-H1.

Each keeps mlx-lm's flags and behaviour; only the loader is ours, so the model
(and any draft model) is built by mlx_falcon_h1.load with its checks and our
implementation.
"""

import sys
from pathlib import Path
from importlib import import_module

from . import mlx_lm_patches
from . import prompt_cache_files
from .cache import FalconH1Cache, PromptCacheError
from .loading import load, sharded_load

# The small Falcon-H1 trained on Python's standard library that ships with the
# package (examples/train_tiny_falcon_h1.py), 8-bit: the default --model.
DEFAULT_MODEL = Path(__file__).parent / "default_model"


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
