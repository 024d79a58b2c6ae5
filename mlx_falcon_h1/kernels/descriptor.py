"""KernelOp: what the run-time check and selfcheck need to know about one kernel op.

Each op module with a Metal kernel (conv1d, ssd_scan, ssm_step) builds one
KernelOp, `KERNEL_OP`, and registers it here by its dispatcher's name. The
run-time check (runtime_check.py) and `python -m mlx_falcon_h1.selfcheck` take
a KernelOp and use its random inputs, its error measure and its tolerance, so
both check a kernel the same way; neither imports an op module by name (the op
modules import the run-time check: it stays below them).
"""

import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple

import mlx.core as mx
import numpy as np


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity (spec is a dict)
class KernelOp:
    """One op with a Metal kernel.

    name: the dispatcher's name ("ssm_step"); the kernel is `name + "_kernel"`.
    spec: the `mx.fast.metal_kernel` arguments (the module's KERNEL_SPEC).
    kernel, reference: `foo_kernel` and `foo_reference` (one signature).
    make_inputs(sizes, batch=1, length=None, seed=0): random keyword arguments
        for kernel and reference at the given op sizes (the keys the dispatcher
        passes to runtime_check.kernel_allowed; extra keys are ignored), with
        `length` tokens (None: the op's check length).
    tolerance: activation dtype -> bound on `relative_error(kernel, reference)`.
    tolerance_dtype(sizes): the dtype whose tolerance bounds a call at these op
        sizes (default: sizes["dtype"], the activation dtype); an op whose
        outputs may be rounded to a coarser dtype than that names it here.
    more_specs: the specs of the op's further kernels, launched by the same
        call (a two-pass op's second pass): the run-time check's key covers
        their sources too.
    """

    name: str
    spec: dict
    kernel: Callable
    reference: Callable
    make_inputs: Callable[..., dict]
    tolerance: Mapping[mx.Dtype, float]
    tolerance_dtype: Callable[[dict], mx.Dtype] = lambda sizes: sizes["dtype"]
    more_specs: Tuple[dict, ...] = ()

    def tolerance_at(self, sizes: dict) -> float:
        """The bound on `relative_error(kernel, reference)` at these op sizes."""
        return self.tolerance[self.tolerance_dtype(sizes)]

    @property
    def module(self):
        """The op module, which holds the built kernel as `_KERNEL` (the emulator swaps it)."""
        return sys.modules[self.kernel.__module__]


_REGISTERED: Dict[str, KernelOp] = {}


def register(op: KernelOp) -> KernelOp:
    """Make `op` known by its name (to the run-time check's cache and name lookups)."""
    _REGISTERED[op.name] = op
    return op


def lookup(name: str) -> KernelOp:
    """The registered op called `name`."""
    try:
        return _REGISTERED[name]
    except KeyError:
        raise ValueError(f"unknown kernel {name!r}; valid: {', '.join(_REGISTERED)}") from None


def registered() -> Iterable[KernelOp]:
    return tuple(_REGISTERED.values())


def output_errors(ours, ref) -> Tuple[float, float]:
    """(max |ours - ref|, that / max |ref|) over all outputs, in float32; the
    relative error is nan if the largest difference is not finite."""
    worst, scale = 0.0, 0.0
    for o, r in zip(ours, ref):
        o, r = o.astype(mx.float32), r.astype(mx.float32)
        # Not max(worst, diff): Python's max(0.0, nan) is 0.0, and a kernel
        # writing NaN would pass (MLX's own max does propagate NaN).
        diff = float(mx.abs(o - r).max())
        worst = diff if diff > worst or math.isnan(diff) or math.isnan(worst) else worst
        scale = max(scale, float(mx.abs(r).max()))
    return worst, worst / max(scale, 1e-30) if math.isfinite(worst) else math.nan


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| over all outputs (nan if any output is not finite)."""
    return output_errors(ours, ref)[1]


class RandomInputs:
    """The input makers' draws: standard normals (times `scale`) cast to a dtype."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape, dtype=mx.float32, scale: float = 1.0) -> mx.array:
        return mx.array((self.rng.standard_normal(shape) * scale).astype(np.float32)).astype(dtype)

    def a_log(self, heads: int, dtype: Optional[mx.Dtype] = None) -> mx.array:
        """A_log in [-5, 1.5]: A = -exp(A_log) spans fast- and slow-forgetting heads."""
        a_log = mx.array(self.rng.uniform(-5.0, 1.5, heads).astype(np.float32))
        return a_log if dtype is None else a_log.astype(dtype)
