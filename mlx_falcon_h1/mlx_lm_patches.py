"""The changes this package makes to mlx-lm's own modules, each with its reason.

Read from mlx-lm 0.32.2 (mlx_lm/models/cache.py). Nothing here runs at import:
`install()` is called by `load_model()` (so by `load()` and `sharded_load()`),
by the entry points (commands.py) and by prompt_cache_files.py, each time (it is
idempotent). A program that calls mlx-lm's functions on a Falcon-H1 model it
built without our loader calls `install()` itself.

The command modules' loaders (`mlx_lm.generate.load` ...) are swapped by
commands.py, which runs those commands; they are not patches of mlx-lm as a
library.
"""

import inspect
import sys
from typing import Optional

import mlx_lm.models.cache as mlx_lm_cache

from .cache import FalconH1Cache


def register_cache_class() -> None:
    """mlx-lm's load_prompt_cache rebuilds each layer's cache from the class name
    stored in the file, looked up in its own module's globals: a file holding
    FalconH1Cache loads only once the name is there."""
    mlx_lm_cache.FalconH1Cache = FalconH1Cache


# --max-kv-size. mlx-lm's make_prompt_cache hands the cache to model.make_cache()
# whenever a model has one, dropping max_kv_size: the flag would be silently
# ignored (it is, for mlx-lm's own falcon_h1). Ours passes it on to a make_cache
# that takes it and leaves every other model to mlx-lm's.
_mlx_lm_make_prompt_cache = mlx_lm_cache.make_prompt_cache


def make_prompt_cache(model, max_kv_size: Optional[int] = None) -> list:
    """mlx-lm's make_prompt_cache, honouring max_kv_size for Falcon-H1 (see above)."""
    if max_kv_size is not None and _takes_max_kv_size(getattr(model, "make_cache", None)):
        return model.make_cache(max_kv_size=max_kv_size)
    return _mlx_lm_make_prompt_cache(model, max_kv_size)


def _takes_max_kv_size(make_cache) -> bool:
    try:
        return "max_kv_size" in inspect.signature(make_cache).parameters
    except (TypeError, ValueError):  # None, or not introspectable
        return False


def _install_make_prompt_cache() -> None:
    """Replace mlx-lm's make_prompt_cache in its cache module (where modules imported
    later take it from) and in every mlx_lm module that imported it already."""
    for name, module in list(sys.modules.items()):
        if (name == "mlx_lm" or name.startswith("mlx_lm.")) and getattr(
            module, "make_prompt_cache", None
        ) is _mlx_lm_make_prompt_cache:
            module.make_prompt_cache = make_prompt_cache


def install() -> None:
    """Every patch above (again: mlx-lm modules imported since take them too)."""
    register_cache_class()
    _install_make_prompt_cache()
