"""mlx-lm's commands (generate, chat, server) running this package's Falcon-H1.

Each keeps mlx-lm's flags and behaviour; only the loader is ours, so the model
(and any draft model) is built by mlx_falcon_h1.load with its checks and our
implementation.
"""

import sys
from pathlib import Path
from importlib import import_module

from mlx_lm.models.cache import LRUPromptCache

from .loading import load

# The small Falcon-H1 trained on Python's standard library that ships with the
# package (examples/train_tiny_falcon_h1.py), 8-bit: the default --model.
DEFAULT_MODEL = Path(__file__).parent / "default_model"
from .sharding import sharded_load


class FalconPromptCache(LRUPromptCache):
    """mlx-lm's server prompt cache, for caches that roll back only a window.

    mlx-lm assumes a trimmable cache can be cut back to any prefix: it trims a
    longer cached prompt down to the shared prefix, and drops the shorter
    entries once a longer one is stored. A Falcon-H1 cache can roll its SSM
    state back only `trimmable` tokens, so stored entries say they cannot be
    trimmed: exact and shorter prefixes are reused, nothing is cut.
    """

    def insert_cache(self, model, tokens, prompt_cache, **kwargs):
        for c in prompt_cache:
            c.stored = True
        super().insert_cache(model, tokens, prompt_cache, **kwargs)

    def fetch_nearest_cache(self, model, tokens):
        cache, rest = super().fetch_nearest_cache(model, tokens)
        for c in cache or []:
            c.stored = False  # a live copy again: speculative decoding may trim it
        return cache, rest


def run_mlx_lm_command(name: str, require_model: bool = True, **replace) -> None:
    """Run `mlx_lm.<name>`'s main() with our loader. Without --model it runs the
    model shipped with the package (require_model: whether a model is needed).

    replace: more of the module's names to swap for ours (the command looks
    them up at call time), e.g. the tuner's helpers for `lora`.
    """
    module = import_module(f"mlx_lm.{name}")
    flags = " ".join(sys.argv[1:]).replace("=", " ").split()
    if require_model and "--model" not in flags and "--prompt-cache-file" not in flags:
        sys.argv[1:1] = ["--model", str(DEFAULT_MODEL)]
    module.load = load  # mlx-lm's commands look their loader up at call time
    if hasattr(module, "sharded_load"):  # chat and server under mlx.launch
        module.sharded_load = sharded_load
    if name == "server":
        module.LRUPromptCache = FalconPromptCache
    for attribute, value in replace.items():
        setattr(module, attribute, value)
    module.main()
