"""Calibrated low-bit quantization of Falcon-H1: GPTQ, AWQ, DWQ and dynamic mixed precision.

    mlx-falcon-h1-convert --hf-path SRC --mlx-path OUT -q --q-bits 4 --method gptq
    python -m mlx_falcon_h1.quantize --hf-path SRC --mlx-path OUT --q-bits 3 --q-group-size 32 --method dwq

mlx-lm 0.32 ships the four methods (mlx_lm/quant/), but they fetch their
calibration data from the Hub, run mlx-lm's own `falcon_h1` and have no AWQ layer
map for it. Here they run on this package's exact model, from the converter (so
the output is a normal converted folder: muP multipliers folded, A_log, D,
dt_bias, conv1d and norms never quantized, quality report, model card), with
calibration text from a local file. mlx-lm's generic pieces are called where
they fit (AWQ's clip search, DWQ's KL loss, dynamic quantization's sensitivity
estimate); what depends on the layer's structure is written here.

One file per method, as mlx-lm's mlx_lm/quant/:
- gptq.py: each Linear column by column, rounding errors pushed onto the rest.
- awq.py: per-channel scales moved into the weights (its scale groups), clip search.
- dwq.py: scales and biases learned by distillation from the float model.
- dynamic.py: the most sensitive layers at more bits, at the plain setting's size.
Shared: settings.py (the settings and their flags), calibration.py (the text
and its token windows), layers.py (the affine grid, packing, dequantized
twins), driver.py (running the model layer by layer over the samples).
`python -m mlx_falcon_h1.quantize` is the converter's command with -q and a
--method (__main__.py); this package never imports the converter.
"""

import sys
import time

import mlx.core as mx

from .awq import apply_scale, awq_groups, awq_quantize
from .calibration import calibration_texts, calibration_tokens, default_calibration_path
from .dwq import dwq_quantize
from .dynamic import check_target_bpw, dynamic_quantize, dynamic_settings
from .gptq import group_grid, gptq_quantize, gptq_weight
from .layers import dequantized_form, fake_quantize, pack, quantizable, restore_modules
from .settings import METHODS, CalibrationSettings, add_arguments, settings_from

QUANTIZERS = {"gptq": gptq_quantize, "awq": awq_quantize, "dwq": dwq_quantize, "dynamic": dynamic_quantize}


def calibrated_quantize(model, tokenizer, bits: int, group_size: int, settings: CalibrationSettings,
                        scale_dtype: mx.Dtype = mx.bfloat16, log=print):  # fmt: skip
    """Quantize `model` (weights folded, as the converter loads it) in place with
    settings.method. Returns (quantization config for config.json, calibration
    record for the model card)."""
    settings.check()
    mx.random.seed(settings.seed)
    tokens, described = calibration_tokens(tokenizer, settings)
    log(f"[calibration] {settings.method}: {tokens.shape[0]} samples x {tokens.shape[1]} tokens from {described}")
    mx.reset_peak_memory()
    started = time.perf_counter()
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    result = QUANTIZERS[settings.method](model, tokens, bits, group_size, scale_dtype, settings, log)
    if settings.method == "dynamic":
        quantization.update(result["per_layer"])
        quantization["bits"], quantization["group_size"] = result["low"]
    record = {
        "method": settings.method,
        "calibration_data": described,
        "calibration_samples": f"{tokens.shape[0]} x {tokens.shape[1]} tokens, seed {settings.seed}",
        "calibration_seconds": round(time.perf_counter() - started, 1),
        "calibration_peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
        "process_peak_rss_gb": round(_peak_rss() / 1e9, 3),
    }
    if settings.method == "awq":
        record["awq_n_grid"] = settings.n_grid
    if settings.method == "dwq":
        record.update(dwq_learning_rate=settings.learning_rate, dwq_epochs=settings.epochs,
                      dwq_init=settings.dwq_init)  # fmt: skip
    if settings.method == "dynamic":
        record.update(dynamic_low=f"{result['low'][0]}-bit g{result['low'][1]}",
                      dynamic_high=f"{result['high'][0]}-bit g{result['high'][1]}",
                      dynamic_target_bpw=round(result["target_bpw"], 3))  # fmt: skip
    return quantization, record


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (NumPy's arrays included, which
    MLX's peak does not count)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes; Linux: KiB


__all__ = [
    "METHODS", "CalibrationSettings", "add_arguments", "settings_from", "calibrated_quantize",
    "calibration_texts", "calibration_tokens", "default_calibration_path",
    "quantizable", "fake_quantize", "pack", "dequantized_form", "restore_modules",
    "group_grid", "gptq_weight", "gptq_quantize", "awq_groups", "apply_scale", "awq_quantize",
    "dwq_quantize", "dynamic_quantize", "dynamic_settings", "check_target_bpw",
]  # fmt: skip
