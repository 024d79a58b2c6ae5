"""Prompt-cache files (mlx-lm's save_prompt_cache / load_prompt_cache) read with clear errors.

A file that cannot be read (missing, truncated, not a prompt cache) or that was
made for another model or configuration raises PromptCacheError naming the file
and the mismatch, instead of failing deep in a layer.
"""

import os

import mlx_lm.models.cache as mlx_lm_cache

from .cache import FalconH1Cache, PromptCacheError, check_fits, mixer_sizes
from .mlx_lm_patches import register_cache_class


def validate_prompt_cache(model, cache, source: str = "prompt cache") -> None:
    """Raise PromptCacheError unless `cache` (a list, one per layer) fits `model`:
    the number of layers, each layer's cache class, SSM, conv and K/V sizes."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return
    if len(cache) != len(layers):
        raise PromptCacheError(
            f"{source}: {len(cache)} layer caches, but the model has {len(layers)} layers; the "
            "file was made for another model")
    for i, (layer, c) in enumerate(zip(layers, cache)):
        if not isinstance(c, FalconH1Cache):
            raise PromptCacheError(
                f"{source}: layer {i} holds a {type(c).__name__}, not a Falcon-H1 cache; the file "
                "was made for another architecture")
        want = mixer_sizes(layer.mamba)
        want.update(kv_heads=layer.self_attn.n_kv_heads, kv_head_dim=layer.self_attn.head_dim)
        check_fits(c, want, f"{source} for this model", layer=i)


def load_prompt_cache(path, model=None, return_metadata: bool = False):
    """mlx-lm's load_prompt_cache with clear errors: a file that cannot be read
    (missing, truncated, not a prompt cache) and, given `model`, a cache that does
    not fit it raise PromptCacheError naming the file and the mismatch."""
    register_cache_class()  # mlx-lm finds cache classes by name in its own module
    if not os.path.isfile(path):
        raise PromptCacheError(f"{path}: no such prompt-cache file")
    try:
        cache, metadata = mlx_lm_cache.load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptCacheError(
            f"{path}: cannot read this prompt-cache file ({first}); it is truncated, damaged "
            "or not a prompt cache saved by mlx_lm.save_prompt_cache") from e
    if model is not None:
        validate_prompt_cache(model, cache, source=str(path))
    return (cache, metadata) if return_metadata else cache
