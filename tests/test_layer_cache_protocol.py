"""The one protocol between a layer and its cache (cache.LayerCache), and how
mlx-lm's patches get installed (mlx_lm_patches.py)."""

import subprocess
import sys

from mlx_falcon_h1.cache import FalconH1Cache, LayerCache
from mlx_falcon_h1.decode import QuantizedStepCache, StepCache

# Reached only when `lengths` is set or `rollback_split` is not 0 (LayerCache's docstring).
EAGER_ONLY = {"restart_rollback_window", "end_padded_call", "with_state"}


def members():
    own = set(vars(LayerCache)) | set(getattr(LayerCache, "__annotations__", {}))
    return {m for m in own if not m.startswith("_")}


def test_both_caches_implement_the_protocol():
    assert {"offset", "update_and_fetch", "whole_buffers", "conv_state", "ssm_state",
            "keep_rollback_inputs"} <= members()  # fmt: skip
    cache = FalconH1Cache()
    assert all(hasattr(cache, m) for m in members())
    step = StepCache(None, None, None, 0, None, None, None)
    assert all(hasattr(step, m) for m in members() - EAGER_ONLY)
    assert step.lengths is None and step.rollback_split(1) == 0 and step.bits is None
    quantized = QuantizedStepCache(8, 32, None, None, None, 0, None, None, None)
    assert (quantized.bits, quantized.group_size) == (8, 32)
    assert cache.bits is None and cache.group_size is None  # float K/V: None, not a missing attribute


def test_importing_the_package_patches_nothing_and_loading_does(tmp_path):
    from conftest import make_checkpoint

    make_checkpoint(tmp_path)
    code = (
        "import sys, mlx_falcon_h1, mlx_lm.models.cache as c, mlx_lm.generate\n"
        "g = sys.modules['mlx_lm.generate']  # mlx_lm.generate is also a function's name\n"
        "original = c.make_prompt_cache\n"
        "assert not hasattr(c, 'FalconH1Cache') and g.make_prompt_cache is original\n"
        f"model, _ = mlx_falcon_h1.load_model({str(tmp_path)!r})\n"
        "assert c.FalconH1Cache is mlx_falcon_h1.cache.FalconH1Cache\n"
        "assert g.make_prompt_cache is c.make_prompt_cache is not original\n"
        "assert type(g.make_prompt_cache(model, max_kv_size=16)[0].kv).__name__ == 'RotatingKVCache'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
