"""The calibration settings, and the command-line flags that fill them (one flag per field)."""

import argparse
from dataclasses import dataclass
from typing import Optional

METHODS = ("gptq", "awq", "dwq", "dynamic")


@dataclass
class CalibrationSettings:
    """The calibration flags (`add_arguments`), with their defaults."""

    method: str = "gptq"
    calibration_data: Optional[str] = None  # file or folder; None: the shipped text
    num_samples: int = 64
    sequence_length: int = 256
    seed: int = 0
    batch_size: int = 8
    n_grid: int = 20  # AWQ: scale ratios and clip ratios searched
    learning_rate: float = 1e-4  # DWQ
    epochs: int = 4  # DWQ: passes over the calibration samples
    temperature: float = 2.0  # DWQ, as mlx-lm's
    dwq_init: str = "plain"  # DWQ: the quantization it starts from: plain, gptq or awq
    grad_checkpoint: bool = False  # DWQ: recompute each layer in the backward pass (big models)
    target_bpw: Optional[float] = None  # dynamic: default = the plain setting's size
    low_bits: Optional[int] = None  # dynamic: default = --q-bits, twice the group size
    low_group_size: Optional[int] = None
    high_bits: Optional[int] = None  # dynamic: default = --q-bits + 1 at --q-group-size
    high_group_size: Optional[int] = None

    def check(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.dwq_init not in ("plain", "gptq", "awq"):
            raise ValueError(f"--dwq-init {self.dwq_init!r}: choose plain, gptq or awq")
        for name in ("num_samples", "sequence_length", "batch_size", "n_grid", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The calibration flags, for the converter's command line."""
    d = CalibrationSettings()
    g = p.add_argument_group("calibrated quantization (with -q)")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="Calibrated method: gptq, awq, dwq or dynamic (mixed bits at the same size).")
    g.add_argument("--calibration-data", "--data-path", default=None,
                   help="A .txt or mlx-lm .jsonl file, or a folder of them (default: the shipped "
                   "calibration text, Python source that is not the evaluation text).")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="Calibration windows.")
    g.add_argument("--sequence-length", type=int, default=d.sequence_length, help="Tokens per window.")
    g.add_argument("--seed", type=int, default=d.seed, help="Picks the windows (and DWQ's order).")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--n-grid", type=int, default=d.n_grid, help="AWQ: scale and clip ratios searched.")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="DWQ: Adam's step.")
    g.add_argument("--epochs", type=int, default=d.epochs, help="DWQ: passes over the samples.")
    g.add_argument("--dwq-init", choices=("plain", "gptq", "awq"), default=d.dwq_init,
                   help="DWQ: the quantization it starts from.")
    g.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="DWQ: recompute each layer in the backward pass (a 7B in 32 GB needs it).")
    g.add_argument("--target-bpw", type=float, default=None,
                   help="dynamic: bits per quantized weight (default: the plain setting's).")
    for name in ("low-bits", "low-group-size", "high-bits", "high-group-size"):
        g.add_argument(f"--{name}", type=int, default=None, help="dynamic: see quantize/dynamic.py.")


def settings_from(kwargs: dict) -> Optional[CalibrationSettings]:
    """Pops the calibration flags out of `kwargs`; None when no --method is given."""
    names = [f for f in CalibrationSettings.__dataclass_fields__ if f != "method"]
    values = {n: kwargs.pop(n) for n in names if n in kwargs}
    method = kwargs.pop("method", None)
    if kwargs:
        raise TypeError(f"unknown calibration argument(s): {', '.join(sorted(kwargs))}")
    if method is None:
        return None
    s = CalibrationSettings(method=method, **{k: v for k, v in values.items() if v is not None})
    s.check()
    return s
