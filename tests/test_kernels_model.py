"""The whole model with its three Metal kernels emulated, against transformers.

The dispatchers take the kernel path here (the emulator stands in for Metal),
so this checks what runs on a Mac: model.py's calls, the cache threading the
conv and SSM states between the prefill kernels and the decode kernel, and the
project's parity bar against FalconH1ForCausalLM.
"""

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close_logits, make_checkpoint, reference_logits
from mlx_falcon_h1 import load_model, msl_emu
from mlx_falcon_h1.fused_projections import fuse_projections
from mlx_falcon_h1.kernels import conv1d, gated_norm, mixer_step, residual_norm, rope, ssd_scan
from mlx_falcon_h1.msl_emu.testing import emulated

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

# mixer_step and gated_norm: the decode step (the norm's kernel after the step's)
MODULES = (conv1d, ssd_scan, mixer_step, gated_norm, rope)
GREEDY_STEPS = 256  # decode steps compared with every kernel on (~9 s here)


@pytest.fixture(autouse=True)
def uncompiled_decode(monkeypatch):
    # The emulator's kernels are Python callables reading arrays through numpy:
    # they cannot run inside mx.compile's trace, so decode runs uncompiled here.
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "0")


@pytest.fixture(scope="module")
def model_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("groups2")
    torch_model = make_checkpoint(path, mamba_n_groups=2, mamba_rms_norm=True)
    return torch_model, load_model(path)[0]


def test_prefill_and_decode_through_the_kernels_match_transformers(model_pair, rng):
    torch_model, model = model_pair
    ids = rng.integers(0, 96, size=(2, 23))
    with emulated(*MODULES, schedules=("forward", "random:1")) as kernels:
        cache = model.make_cache()
        pieces = []
        for start, stop in [(0, 19), (19, 20), (20, 21), (21, 23)]:  # prefill, 2 steps, 2 tokens
            logits = model(mx.array(ids[:, start:stop]), cache=cache)
            mx.eval(logits, [c.state for c in cache])
            pieces.append(np.array(logits))
        assert all(k.last for k in kernels), "a kernel was not used"
    assert_close_logits(np.concatenate(pieces, axis=1), reference_logits(torch_model, ids))


def test_kernels_off_gives_the_reference_path(model_pair, rng, monkeypatch):
    _, model = model_pair
    ids = mx.array(rng.integers(0, 96, size=(1, 9)))
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    with emulated(*MODULES) as kernels:
        model(ids)
        assert not any(k.last for k in kernels)


def greedy(model, prompt, steps):
    """Greedy tokens and every step's logits after `prompt` (1, L)."""
    cache = model.make_cache()
    logits = model(prompt, cache=cache)[:, -1:]
    tokens, all_logits = [], []
    for _ in range(steps):
        all_logits.append(np.array(logits[0, -1]))
        token = mx.argmax(logits[:, -1], axis=-1)
        tokens.append(token.item())
        logits = model(token[:, None], cache=cache)
    return tokens, np.stack(all_logits)


def test_generation_with_every_kernel_is_the_unfused_models(tmp_path, rng, monkeypatch):
    """The model as a Mac runs generation (projections fused, every kernel: the decode
    step's gated norm writing out_proj's fused input) against the plain model on
    the reference path: logits within 1e-5 of the largest, greedy tokens identical."""
    make_checkpoint(tmp_path, mamba_n_groups=2, mamba_rms_norm=True)
    plain, fused = load_model(tmp_path)[0], load_model(tmp_path)[0]
    fuse_projections(fused)
    prompt = mx.array(rng.integers(0, 96, size=(1, 11)))
    with emulated(*MODULES, residual_norm, schedules=("forward",)) as kernels:
        tokens, logits = greedy(fused, prompt, GREEDY_STEPS)
        assert all(k.last for k in kernels), "a kernel was not used"
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    want_tokens, want_logits = greedy(plain, prompt, GREEDY_STEPS)
    assert tokens == want_tokens
    assert np.abs(logits - want_logits).max() <= 1e-5 * np.abs(want_logits).max()


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_bits_decode_with_the_kernel_is_the_reference_paths(tmp_path, rng, monkeypatch, bits):
    """--kv-bits, as a Mac decodes: the quantized attention kernel over the quantized
    bulk and the float tail (shortened to 16 tokens here, so the steps cross three
    flushes), with every other kernel, against the reference path: logits within
    1e-5 of the largest, greedy tokens identical."""
    from mlx_falcon_h1.kernels import quantized_attention
    from mlx_falcon_h1.quantized_kv import QuantizedKVWithTail

    monkeypatch.setattr(QuantizedKVWithTail, "tail_capacity", 16)
    make_checkpoint(tmp_path, head_dim=64, mamba_rms_norm=True)
    model = load_model(tmp_path)[0]
    fuse_projections(model)
    prompt = mx.array(rng.integers(0, 96, size=(1, 11)))

    def run():
        cache = model.make_cache()
        logits = model(prompt, cache=cache)[:, -1:]
        for c in cache:
            c.to_quantized(group_size=32, bits=bits)
        tokens, all_logits = [], []
        for _ in range(56):
            token = mx.argmax(logits[:, -1], axis=-1)
            tokens.append(token.item())
            logits = model(token[:, None], cache=cache)
            all_logits.append(np.array(logits[0, -1]))
        return tokens, np.stack(all_logits)

    with emulated(*MODULES, residual_norm, quantized_attention, schedules=("forward",)) as kernels:
        tokens, logits = run()
        assert kernels[-1].last, "the quantized attention kernel was not used"
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    want_tokens, want_logits = run()
    assert tokens == want_tokens
    assert np.abs(logits - want_logits).max() <= 1e-5 * np.abs(want_logits).max()
