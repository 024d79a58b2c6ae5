"""--max-kv-size: each layer's attention K/V bounded as mlx-lm's RotatingKVCache
bounds it (the first 4 tokens and the latest ones), conv and SSM state whole."""

import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import batch_generate, generate_step
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache, save_prompt_cache

from conftest import make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load, load_model
from mlx_falcon_h1.cache import KEEP_TOKENS, FalconH1Cache
from mlx_falcon_h1.prompt_cache_files import load_prompt_cache
from mlx_falcon_h1.decode import CompiledDecode

WINDOW = 24
PROMPT = mx.array([[3, 17, 5, 40, 9, 11, 60, 2, 33, 8, 1, 70]])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("window")
    make_checkpoint(path, mamba_rms_norm=True)
    return load_model(path)[0]


class _WindowMaskCache(FalconH1Cache):
    """The reference: a whole K/V, with attention masked to what a window of
    WINDOW keeps (the first KEEP_TOKENS and the latest WINDOW - KEEP_TOKENS)."""

    def make_mask(self, n, **kwargs):
        assert n == 1
        seen = self.kv.offset + 1  # with this token
        keys = mx.arange(seen)
        return ((keys < KEEP_TOKENS) | (keys >= seen - (WINDOW - KEEP_TOKENS)))[None]

    def whole_buffers(self):
        return None  # attention reads the returned keys under the mask above


def decode(model, cache, steps):
    """Greedy decode from PROMPT, one token at a time: (logits per step, tokens)."""
    token, out, tokens = None, [], []
    for i in range(PROMPT.shape[1] + steps):
        x = PROMPT[:, i : i + 1] if i < PROMPT.shape[1] else token
        logits = model(x, cache=cache)
        mx.eval(logits, [c.state for c in cache])
        token = logits[:, -1:].argmax(-1)
        if i >= PROMPT.shape[1] - 1:
            out.append(np.array(logits[0, -1]))
            tokens.append(token.item())
    return np.stack(out), tokens


@pytest.mark.parametrize("compiled", ["1", "0"])
def test_window_keeps_the_first_and_latest_keys_and_the_whole_state(model, monkeypatch, compiled):
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", compiled)
    windowed, tokens = decode(model, model.make_cache(max_kv_size=WINDOW), 60)
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "0")
    reference, ref_tokens = decode(model, [_WindowMaskCache() for _ in model.layers], 60)
    whole, _ = decode(model, model.make_cache(), 60)
    scale = np.abs(reference).max()
    assert np.abs(windowed - reference).max() <= 1e-5 * scale
    assert tokens == ref_tokens
    # Before the window fills it is the whole context; after, an approximation.
    early = WINDOW - PROMPT.shape[1]
    assert np.abs(windowed[:early] - whole[:early]).max() <= 1e-5 * scale
    assert np.abs(windowed[early + 2 :] - whole[early + 2 :]).max() > 1e-3 * scale
    kv = model.make_cache(max_kv_size=WINDOW)[0].kv
    assert isinstance(kv, RotatingKVCache) and kv.max_size == WINDOW and kv.keep == KEEP_TOKENS


def test_the_compiled_step_serves_a_window(model, monkeypatch):
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1")
    monkeypatch.delitem(model.__dict__, "_compiled_decode", raising=False)  # a fresh step
    cache = model.make_cache(max_kv_size=WINDOW)
    model(PROMPT, cache=cache)
    assert CompiledDecode.eligible(cache, len(model.layers))
    forward_calls = []
    original = type(model).forward

    def counting_forward(self, inputs, cache=None):
        forward_calls.append(inputs.shape[1])
        return original(self, inputs, cache)

    monkeypatch.setattr(type(model), "forward", counting_forward)
    for _ in range(40):
        mx.eval(model(mx.array([[5]]), cache=cache), [c.state for c in cache])
    step = model.__dict__["_compiled_decode"]
    # forward runs once eagerly (the first step) and once per trace; the buffer
    # reaches the window at the first step and keeps that size: one trace.
    assert step.traces == 1 and len(forward_calls) == 2
    assert cache[0].kv.keys.shape[2] == WINDOW and cache[0].kv.offset == PROMPT.shape[1] + 40


def test_long_prompt_in_steps_keeps_memory_to_the_window(model):
    tokens = mx.array(np.random.default_rng(0).integers(0, 90, (1, 600)))
    cache = make_prompt_cache(model, max_kv_size=64)  # mlx-lm's own entry point
    assert isinstance(cache[0].kv, RotatingKVCache)
    for start in range(0, 600, 100):
        model(tokens[:, start : start + 100], cache=cache)
        mx.eval([c.state for c in cache])
        # A step's keys see the window before them: at most 64 - 1 + 100 held.
        assert cache[0].kv.keys.shape[2] <= 64 - 1 + 100
    logits = model(mx.array([[5]]), cache=cache)
    assert cache[0].kv.keys.shape[2] == 64 and np.isfinite(np.array(logits)).all()


def test_generate_step_and_batches_honour_max_kv_size(model, tmp_path):
    path = tmp_path / "m"
    make_checkpoint(path)
    make_tokenizer(path)
    m, tokenizer = load(str(path))
    seen = []
    original = m.make_cache

    def recording(max_kv_size=None):
        seen.append(max_kv_size)
        return original(max_kv_size)

    m.make_cache = recording
    prompt = mx.array(np.random.default_rng(1).integers(3, 90, 80))
    steps = [t for t, _ in zip((t for t, _ in generate_step(prompt, m, max_kv_size=32)), range(5))]
    assert seen == [32] and len(steps) == 5
    # batch_generate: each prompt's cache made with the window, merged, decoded.
    prompts = [list(range(3, 60)), [5, 9, 11]]
    windowed = batch_generate(m, tokenizer, prompts, max_tokens=6, max_kv_size=32, verbose=False)
    assert seen[1:] and set(seen[1:]) == {32}
    whole = batch_generate(m, tokenizer, prompts, max_tokens=6, verbose=False)
    # The short prompt never fills its window: the same tokens as the whole cache.
    assert windowed.texts[1] == whole.texts[1]


def test_refusals_are_clear(model, tmp_path):
    cache = model.make_cache(max_kv_size=WINDOW)
    model(mx.array(np.arange(3, 3 + 40)[None]), cache=cache)
    model(mx.array([[5]]), cache=cache)
    with pytest.raises(ValueError, match="--kv-bits cannot be combined with --max-kv-size"):
        cache[0].to_quantized(bits=8)
    assert cache[0].trimmable == 0
    with pytest.raises(ValueError, match="bounded .*--max-kv-size 24.* full"):
        cache[0].trim(1)
    for bad in (0, 4, -1, 2.5):
        with pytest.raises(ValueError, match="max_kv_size must be an integer above 4"):
            model.make_cache(max_kv_size=bad)
    # Before the window fills, trimming works as with the whole cache.
    short = model.make_cache(max_kv_size=WINDOW)
    model(PROMPT, cache=short)
    assert short[0].trimmable > 0 and short[0].trim(2) == 2
    with pytest.raises(ValueError, match="different --max-kv-size"):
        FalconH1Cache.merge([FalconH1Cache(max_kv_size=16), FalconH1Cache(max_kv_size=32)])


def test_prompt_cache_files_keep_the_window(model, tmp_path):
    cache = model.make_cache(max_kv_size=WINDOW)
    model(mx.array(np.arange(3, 3 + 40)[None]), cache=cache)
    save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
    loaded = load_prompt_cache(str(tmp_path / "c.safetensors"), model)
    assert loaded[0].max_kv_size == WINDOW
    token = mx.array([[7]])
    for _ in range(3):  # the first call checks the file's cache, then decode
        a, b = model(token, cache=cache), model(token, cache=loaded)
        assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-kv-size", "64", "--kv-bits", "8"], "cannot be combined with --kv-bits"),
        (["--max-kv-size", "3"], "max_kv_size must be an integer above 4"),
        (["--max-kv-size=64", "--draft-model", "x"], "cannot be combined with --draft-model"),
    ],
)
def test_cli_refuses_before_loading(flags, message):
    run = subprocess.run([sys.executable, "-m", "mlx_falcon_h1.generate", "--prompt", "hi", *flags],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and message in run.stderr


def test_cli_generates_with_a_window():
    run = subprocess.run([sys.executable, "-m", "mlx_falcon_h1.generate", "--prompt", "def f(x):",
                          "--max-tokens", "40", "--max-kv-size", "16"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    # Past the 16-token window. The count is read from mlx-lm's statistics line
    # where it prints one in 0.32's form; its wording is not ours to pin.
    count = re.search(r"Generation: (\d+) tokens", run.stdout)
    assert run.stdout.strip() and (count is None or int(count[1]) == 40), run.stdout


def test_server_flag_sets_the_models_window(monkeypatch):
    from mlx_falcon_h1 import server

    argv = ["server", "--port", "1", "--max-kv-size=48"]
    assert server._take_flag(argv, "--max-kv-size", "tokens") == 48 and argv == ["server", "--port", "1"]
    loaded = server._with_window(lambda *a, **k: (type("M", (), {})(), None), 48)()
    assert loaded[0].max_kv_size == 48


def test_mlx_lm_modules_imported_earlier_get_the_window_too(monkeypatch):
    """A module of mlx-lm's that took make_prompt_cache by name before our
    package was imported (e.g. `import mlx_lm.generate` first) is updated too."""
    import types

    from mlx_falcon_h1 import mlx_lm_patches as cache_module

    early = types.ModuleType("mlx_lm.imported_early")
    early.make_prompt_cache = cache_module._mlx_lm_make_prompt_cache
    monkeypatch.setitem(sys.modules, "mlx_lm.imported_early", early)
    cache_module._install_make_prompt_cache()
    assert early.make_prompt_cache is cache_module.make_prompt_cache
    unrelated = types.ModuleType("other")
    unrelated.make_prompt_cache = cache_module._mlx_lm_make_prompt_cache
    monkeypatch.setitem(sys.modules, "other", unrelated)
    cache_module._install_make_prompt_cache()
    assert unrelated.make_prompt_cache is cache_module._mlx_lm_make_prompt_cache  # not mlx-lm's
