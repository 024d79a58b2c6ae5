"""Prompt-cache files made for another model or configuration, or damaged, fail with
an error naming the file and the mismatch (not a shape error deep in a layer)."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache as mlx_lm_load_prompt_cache
from mlx_lm.models.cache import save_prompt_cache

from conftest import make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load_model
from mlx_falcon_h1.cache import PromptCacheError
from mlx_falcon_h1.prompt_cache_files import load_prompt_cache

IDS = np.random.default_rng(0).integers(0, 96, size=(1, 12))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    variants = {"base": {}, "state16": dict(mamba_d_state=16), "layers3": dict(num_hidden_layers=3),
                "kv4": dict(num_key_value_heads=4)}
    out = {}
    for name, overrides in variants.items():
        path = tmp_path_factory.mktemp(name)
        make_checkpoint(path, **overrides)
        out[name] = (path, load_model(path)[0])
    return out


@pytest.fixture(scope="module")
def cache_file(models, tmp_path_factory):
    model = models["base"][1]
    cache = model.make_cache()
    mx.eval(model(mx.array(IDS[:, :10]), cache=cache))
    path = tmp_path_factory.mktemp("pc") / "prompt.safetensors"
    save_prompt_cache(str(path), cache, {"model": str(models["base"][0])})
    return path


def test_a_fitting_file_loads_and_continues_exactly(models, cache_file):
    model = models["base"][1]
    cache = load_prompt_cache(cache_file, model=model)
    rest = model(mx.array(IDS[:, 10:]), cache=cache)
    whole = model(mx.array(IDS))
    assert np.allclose(np.array(rest), np.array(whole[:, 10:]), atol=1e-4)


@pytest.mark.parametrize("variant,message", [
    ("state16", r"layer 0: its SSM state \(H heads, P head dim, N state size\) is \(6, 16, 8\), "
                r"the model's is \(6, 16, 16\)"),
    ("layers3", r"2 layer caches, but the model has 3 layers"),
    ("kv4", r"layer 0: its attention keys \(KV heads, _, head_dim\) is \(2, 24\), the model's "
            r"is \(4, 24\)"),
])
def test_a_file_for_another_configuration_is_named(models, cache_file, variant, message):
    with pytest.raises(PromptCacheError, match=message) as info:
        load_prompt_cache(cache_file, model=models[variant][1])
    assert str(cache_file) in str(info.value)


@pytest.mark.parametrize("variant,message", [
    ("state16", r"its SSM state .* is \(6, 16, 8\), the model's is \(6, 16, 16\)"),
    ("kv4", r"its attention K/V has 2 KV heads, this model's layer 4"),
])
def test_mlx_lm_loader_then_our_model_names_the_mismatch(models, cache_file, variant, message):
    """mlx_lm.load_prompt_cache knows no model: the first forward call checks."""
    cache = mlx_lm_load_prompt_cache(str(cache_file))
    with pytest.raises(PromptCacheError, match=message):
        models[variant][1](mx.array(IDS[:, 10:]), cache=cache)


def test_truncated_and_missing_files(cache_file, tmp_path):
    data = cache_file.read_bytes()
    for cut in (len(data) // 2, 40, 0):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(PromptCacheError, match=rf"{bad}: cannot read this prompt-cache file"):
            load_prompt_cache(bad)
    with pytest.raises(PromptCacheError, match="no such prompt-cache file"):
        load_prompt_cache(tmp_path / "absent.safetensors")


def test_generate_command_names_the_mismatch(models, tmp_path):
    """mlx-lm refuses a different model path; the same path with another
    configuration (re-converted, edited) is caught by the check."""
    path = models["state16"][0]
    make_tokenizer(path)
    model = models["base"][1]
    cache = model.make_cache()
    mx.eval(model(mx.array(IDS[:, :10]), cache=cache))
    stale = tmp_path / "stale.safetensors"
    save_prompt_cache(str(stale), cache, {"model": str(path), "chat_template": "",
                                          "tokenizer_config": "{}"})
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_falcon_h1.generate", "--model", str(path),
         "--prompt-cache-file", str(stale), "--prompt", "def", "--max-tokens", "2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "error:" in proc.stderr and "SSM state" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
