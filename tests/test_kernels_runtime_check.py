"""The run-time kernel check, with the emulator standing in for the GPU.

On a Mac each kernel is checked once against its reference at the model's
mixer sizes before its first use, and turned off (reference path, one warning,
cached) if it disagrees or cannot run. Here the emulated kernels play the GPU:
`runtime_check.gpu_name` is patched to report a GPU, everything else is the code
a Mac runs.
"""

import json
import warnings

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close_logits, make_checkpoint
from mlx_falcon_h1 import load_model, msl_emu, selfcheck
from mlx_falcon_h1.kernels import conv1d, gated_norm, residual_norm, runtime_check, ssd_scan, mixer_step
from mlx_falcon_h1.msl_emu import metal_kernel
from mlx_falcon_h1.msl_emu.testing import emulated

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

MODULES = (conv1d, ssd_scan, mixer_step, residual_norm, gated_norm)
FAST = dict(schedules=("forward",), track_races=False)
# The decode kernel with its output scaled by 1.01: a plausible wrong-layout bug,
# small enough that only a comparison with the reference catches it.
_Y_LINE = "const float yv = acc + xv * static_cast<float>(D[h * D_strides[0]]);"
assert _Y_LINE in mixer_step.KERNEL_SPEC["source"]
WRONG_STEP_SPEC = dict(mixer_step.KERNEL_SPEC, name="planted_wrong_mixer_step",
                       source=mixer_step.KERNEL_SPEC["source"].replace(
                           _Y_LINE, _Y_LINE.replace("acc +", "1.01f * acc +")))


class Counting:
    """Wraps a kernel: counts launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __call__(self, **kwargs):
        self.calls += 1
        return self.kernel(**kwargs)


class FailsToBuild:
    """A kernel whose library does not compile on this GPU."""

    calls = 0

    def __call__(self, **kwargs):
        self.calls += 1
        raise RuntimeError("[metal::Device] Unable to build metal library from source\n"
                           "error: planted compiler difference")


@pytest.fixture
def on_gpu(monkeypatch, tmp_path):
    """The check believes it runs on a GPU; its cache lives in tmp_path."""
    monkeypatch.setattr(runtime_check, "gpu_name", lambda: "Emulated GPU (msl_emu)")
    monkeypatch.setenv("MLX_FALCON_H1_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MLX_FALCON_H1_KERNEL_CHECK", raising=False)
    # The emulator's kernels are Python callables reading arrays through numpy:
    # they cannot run inside mx.compile's trace, so decode runs uncompiled here.
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "0")
    runtime_check.reset()
    yield tmp_path / runtime_check.CACHE_FILE
    runtime_check.reset()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("rtcheck")
    make_checkpoint(path, mamba_n_groups=2, mamba_rms_norm=True)
    return load_model(path)[0]


IDS = np.random.default_rng(3).integers(0, 96, size=(1, 21))


def run(model):
    """Prefill 18 tokens, then 3 decode steps: every kernel the model uses."""
    cache = model.make_cache()
    pieces = []
    for start, stop in [(0, 18), (18, 19), (19, 20), (20, 21)]:
        logits = model(mx.array(IDS[:, start:stop]), cache=cache)
        mx.eval(logits)
        pieces.append(np.array(logits))
    return np.concatenate(pieces, axis=1)


@pytest.fixture(scope="module")
def reference(model):
    import os

    os.environ["MLX_FALCON_H1_KERNELS"] = "0"
    try:
        return run(model)
    finally:
        del os.environ["MLX_FALCON_H1_KERNELS"]


def kernel_warnings(record):
    return [w for w in record if issubclass(w.category, runtime_check.KernelCheckWarning)]


def cached(path):
    """The cache file's entries for the one device, keyed without the source digest."""
    (device,) = json.loads(path.read_text())["devices"].values()
    assert all(" (kernel " in key for key in device), list(device)
    return {key.split(" (kernel ")[0]: entry for key, entry in device.items()}


def test_real_kernels_pass_and_stay_on(on_gpu, model, reference):
    with emulated(*MODULES, **FAST) as kernels, warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        counters = [Counting(k) for k in kernels]
        for m, c in zip(MODULES, counters):
            m._KERNEL = c
        logits = run(model)
    assert not kernel_warnings(record)
    entries = cached(on_gpu)
    assert sorted(k.split()[0] for k in entries) == ["causal_conv1d", "gated_norm", "mixer_step",
                                                     "residual_rms_norm", "residual_rms_norm", "ssd_scan"]
    assert all(e["ok"] and e["max_rel_err"] <= e["tolerance"] for e in entries.values()), entries
    assert "mixer_step H6 P16 G2 N8 K4 float32/float32 norm_first out=float32" in entries
    # Each kernel: one check launch per key, then the model's own launches (2 layers;
    # the norm: 2 per layer and the final one, in each of the 4 forward calls).
    # gated_norm: once per mixer step, after it (the model's mixers have the norm),
    # its own check, and once in mixer_step's check (which runs the whole step).
    conv, scan, step, norm, gated = (c.calls for c in counters)
    assert (conv, scan, step, norm, gated) == (1 + 2, 1 + 2, 1 + 2 * 3, 2 + 4 * 5, 2 + 2 * 3), (
        conv, scan, step, norm, gated)
    assert_close_logits(logits, reference)


def test_wrong_kernel_is_turned_off_with_one_warning_and_cached(on_gpu, model, reference,
                                                                monkeypatch):
    wrong = Counting(metal_kernel(**WRONG_STEP_SPEC, **FAST))
    # Negative control: unchecked, the planted kernel really changes the logits.
    monkeypatch.setenv("MLX_FALCON_H1_KERNEL_CHECK", "0")
    with emulated(conv1d, ssd_scan, **FAST):
        monkeypatch.setattr(mixer_step, "_KERNEL", wrong)
        unchecked = run(model)
    with pytest.raises(AssertionError):
        assert_close_logits(unchecked, reference)
    monkeypatch.delenv("MLX_FALCON_H1_KERNEL_CHECK")
    assert not on_gpu.exists()  # the switch skipped the check entirely

    wrong.calls = 0
    with emulated(conv1d, ssd_scan, **FAST), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monkeypatch.setattr(mixer_step, "_KERNEL", wrong)
        logits = run(model)
        run(model)  # a second generation: no second warning
    assert_close_logits(logits, reference)
    assert wrong.calls == 1  # the check's launch; the model never used it
    (w,) = kernel_warnings(record)
    text = str(w.message)
    assert "mixer_step" in text and "max relative error" in text
    assert "python -m mlx_falcon_h1.selfcheck" in text
    entries = cached(on_gpu)
    bad = entries["mixer_step H6 P16 G2 N8 K4 float32/float32 norm_first out=float32"]
    assert bad["ok"] is False and bad["max_rel_err"] > bad["tolerance"]
    assert entries["causal_conv1d C128 K4 float32/float32"]["ok"]
    lines = []  # what `python -m mlx_falcon_h1.selfcheck` prints about it on a Mac
    assert selfcheck.report_runtime_checks(out=lines.append) is False
    assert any("mixer_step" in line and "FAILED, turned off" in line for line in lines), lines

    # A later process: the cached verdict, no new check, one warning again.
    runtime_check.reset()
    wrong.calls = 0
    with emulated(conv1d, ssd_scan, **FAST), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monkeypatch.setattr(mixer_step, "_KERNEL", wrong)
        assert_close_logits(run(model), reference)
    assert wrong.calls == 0
    (w,) = kernel_warnings(record)
    assert "cached in" in str(w.message)


def test_a_wrong_norm_kernel_is_turned_off_and_the_step_kernel_stays(on_gpu, model, reference,
                                                                     monkeypatch):
    """gated_norm's kernel wrong (its r from the sum plus one): turned off with one
    warning; mixer_step's kernel still runs and gated_norm's reference finishes the
    norm, so the logits are the reference's."""
    line = "const float r = metal::precise::rsqrt(total / static_cast<float>(dg) + eps);"
    assert line in gated_norm.KERNEL_SPEC["source"]
    wrong = Counting(metal_kernel(**dict(
        gated_norm.KERNEL_SPEC, name="planted_wrong_gated_norm",
        source=gated_norm.KERNEL_SPEC["source"].replace(line, line.replace("total /", "(total + 1.0f) /"))),
        **FAST))
    with emulated(conv1d, ssd_scan, mixer_step, **FAST) as (_, _, step), \
            warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monkeypatch.setattr(gated_norm, "_KERNEL", wrong)
        mixer_step._KERNEL = step = Counting(step)  # emulated() puts the real one back
        logits = run(model)
    assert_close_logits(logits, reference)
    (w,) = kernel_warnings(record)
    assert "gated_norm" in str(w.message) and "max relative error" in str(w.message)
    assert wrong.calls == 1  # the check's launch only
    assert step.calls > 1  # the mixer step's kernel: its check and the model's decode steps


def test_kernel_that_fails_to_build_is_turned_off(on_gpu, model, reference, monkeypatch):
    broken = FailsToBuild()
    with emulated(conv1d, mixer_step, **FAST), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        monkeypatch.setattr(ssd_scan, "_KERNEL", broken)
        logits = run(model)
    assert_close_logits(logits, reference)
    assert broken.calls == 1
    (w,) = kernel_warnings(record)
    assert "ssd_scan" in str(w.message) and "Unable to build metal library" in str(w.message)
    entry = cached(on_gpu)["ssd_scan H6 P16 G2 N8 float32"]
    assert entry["ok"] is False and entry["error"].startswith("RuntimeError")


def test_never_on_the_cpu(model, monkeypatch, tmp_path):
    """Without a GPU (the real gpu_name here) nothing is checked or written."""
    monkeypatch.setenv("MLX_FALCON_H1_CACHE_DIR", str(tmp_path))
    runtime_check.reset()
    assert runtime_check.gpu_name() is None
    assert runtime_check.kernel_allowed("mixer_step", {})  # no GPU: nothing to veto
    assert not list(tmp_path.iterdir())
    # A Mac whose default device is the CPU (as here): still nothing to check.
    monkeypatch.setattr(runtime_check, "metal_available", lambda: True)
    assert mx.default_device() == mx.cpu and runtime_check.gpu_name() is None


def test_unreadable_cache_is_checked_again_and_rewritten(on_gpu):
    on_gpu.write_text("{ truncated")
    sizes = dict(channels=40, width=4, dtype=mx.float32, wdtype=mx.float32)
    with emulated(conv1d, **FAST):
        assert runtime_check.kernel_allowed("causal_conv1d", sizes)
    assert cached(on_gpu)["causal_conv1d C40 K4 float32/float32"]["ok"]
    assert not list(on_gpu.parent.glob(".kernel_check.*"))  # no temporary file left behind


def test_mixer_step_calls_are_checked_apart(on_gpu):
    """Norm mode, output dtype and prefix each change the kernel or its output: each
    has its own check and cache entry (the key once named only the mixer sizes)."""
    base = dict(heads=2, head_dim=16, groups=1, n=8, width=4, dtype=mx.bfloat16,
                wdtype=mx.float32, norm="none", out_dtype=mx.bfloat16, prefix=0,
                prefix_dtype=None)
    calls = [base, dict(base, norm="norm_first"), dict(base, out_dtype=mx.float32),
             dict(base, prefix=24, prefix_dtype=mx.bfloat16),
             dict(base, prefix=24, prefix_dtype=mx.float32)]
    with emulated(mixer_step, **FAST):
        assert all(runtime_check.kernel_allowed("mixer_step", sizes) for sizes in calls)
    entries = cached(on_gpu)
    assert len(entries) == len(calls) and all(e["ok"] for e in entries.values()), entries
    assert "mixer_step H2 P16 G1 N8 K4 bfloat16/float32 none out=bfloat16 prefix=24/float32" in entries


def test_check_bounds_a_call_by_the_coarsest_dtype_it_rounds_to(on_gpu):
    """float32 activations normed into bfloat16: the bfloat16 tolerance, under its own key."""
    sizes = dict(dim=1000, dtype=mx.float32, delta=mx.float32, wdtype=mx.float32,
                 out_dtype=mx.bfloat16)
    with emulated(residual_norm, **FAST):
        assert runtime_check.kernel_allowed("residual_rms_norm", sizes)
    entry = cached(on_gpu)["residual_rms_norm D1000 float32+float32/float32 out=bfloat16"]
    assert entry["ok"] and entry["tolerance"] == residual_norm.KERNEL_OP.tolerance[mx.bfloat16]
