"""The kernels check themselves on the GPU they run on, and step aside if wrong.

Our Metal kernels are verified in an emulator, not on every Apple GPU. So the
first time a dispatcher is about to launch a kernel for a given set of mixer
sizes (heads, head dim, groups, state size, conv width, dtypes) on a Metal
device, it runs that kernel once on small random inputs of exactly those
sizes and compares it with its pure-MLX reference. A kernel that disagrees
beyond its dtype's tolerance, or fails to compile or launch, is turned off
for those sizes on this device: the dispatcher takes the reference
path instead, and one warning (KernelCheckWarning) names the kernel, the
error and the command that reports it.

Results are kept in memory and in `kernel_check.json` in the user's cache
folder ($MLX_FALCON_H1_CACHE_DIR, else $XDG_CACHE_HOME/mlx_falcon_h1, else
~/.cache/mlx_falcon_h1), keyed by package version, MLX version and GPU name
(and each entry by the kernel source's digest), so each check runs once per
machine and upgrade. A kernel found wrong warns
again once in each later process (from the cached result) and stays off.

Never on the CPU (there are no kernels to check); MLX_FALCON_H1_KERNEL_CHECK=0
skips the check (kernels run unchecked); MLX_FALCON_H1_KERNELS=0 turns the
kernels off altogether.

Each op is a KernelOp (descriptor.py) that its op module registers; the
dispatchers pass theirs to `kernel_allowed`, and this module imports no op
module, so the op modules can import it.
"""

import functools
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping
from typing import Optional, Union

import mlx.core as mx

from . import metal_available
from .descriptor import KernelOp, lookup, registered, relative_error

REPORT_COMMAND = "python -m mlx_falcon_h1.selfcheck"
CACHE_FILE = "kernel_check.json"
_FORMAT = 1


class KernelCheckWarning(RuntimeWarning):
    """A Metal kernel disagreed with its reference on this GPU and was turned off."""


def _op(op: Union[KernelOp, str]) -> KernelOp:
    """A KernelOp, or the registered one of that name (tests and tools name ops)."""
    return op if isinstance(op, KernelOp) else lookup(op)


class _Tolerances(Mapping):
    """(op name, activation dtype) -> each registered op's tolerance: the bound on
    max |kernel - reference| / max |reference|, the same as the emulator tests'."""

    def __getitem__(self, key):
        name, dtype = key
        return lookup(name).tolerance[dtype]

    def __iter__(self):
        return ((op.name, dtype) for op in registered() for dtype in op.tolerance)

    def __len__(self):
        return sum(len(op.tolerance) for op in registered())


TOLERANCE = _Tolerances()


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def describe(op: Union[KernelOp, str], sizes: dict) -> str:
    """'ssm_step H24 P128 G1 N256 K4 bfloat16/float32': the key of one check; with
    mixer_step's sizes also its norm mode, output dtype and prefix, as in
    'mixer_step H24 P128 G1 N256 K4 bfloat16/float32 norm_first out=bfloat16
    prefix=1536/bfloat16' (each a different kernel or output), gated_norm's gate
    dtype or none as 'gate=...'; a second input's dtype follows the
    activations' after '+' (residual_rms_norm's delta); attention ops add their K/V heads
    and quantized K/V's bits and group size: 'quantized_decode_attention H12 Hkv2 P128
    bits4 gs64 bfloat16'."""
    parts = [_op(op).name]
    for field, letter in (("heads", "H"), ("kv_heads", "Hkv"), ("head_dim", "P"),
                          ("groups", "G"), ("n", "N"), ("channels", "C"), ("width", "K"),
                          ("dim", "D"), ("bits", "bits"), ("group_size", "gs")):
        if field in sizes:
            parts.append(f"{letter}{sizes[field]}")
    dtypes = _dtype_name(sizes["dtype"])
    if sizes.get("delta") is not None:
        dtypes += "+" + _dtype_name(sizes["delta"])
    if "wdtype" in sizes:
        dtypes += "/" + _dtype_name(sizes["wdtype"])
    parts.append(dtypes)
    if "norm" in sizes:
        parts.append(sizes["norm"])
    if "gate" in sizes:  # gated_norm's: a gate after the norm, or none
        parts.append("gate=" + ("none" if sizes["gate"] is None else _dtype_name(sizes["gate"])))
    if "out_dtype" in sizes:
        parts.append(f"out={_dtype_name(sizes['out_dtype'])}")
    if sizes.get("prefix"):
        parts.append(f"prefix={sizes['prefix']}/"
                     f"{_dtype_name(sizes.get('prefix_dtype') or sizes['dtype'])}")
    return " ".join(parts)


def check_inputs(op: Union[KernelOp, str], sizes: dict, batch: int = 1,
                 length: Optional[int] = None, seed: int = 0) -> dict:
    """Random inputs of `op`'s kernel signature at the given op sizes (its make_inputs)."""
    return _op(op).make_inputs(sizes, batch=batch, length=length, seed=seed)


def run_check(op: Union[KernelOp, str], sizes: dict) -> dict:
    """Run `op`'s kernel and reference once at `sizes`; a result record (never raises
    for a kernel failure: a compile or launch error is the record's `error`)."""
    op = _op(op)
    inputs = op.make_inputs(sizes)
    tolerance = op.tolerance_at(sizes)
    start = time.perf_counter()
    try:
        ours = op.kernel(**inputs)
        mx.eval(ours)
        ref = op.reference(**inputs)
        mx.eval(ref)
        rel = relative_error(ours, ref)
        error = None if rel <= tolerance else (
            f"max relative error {rel:.3g} > tolerance {tolerance:.3g} against {op.name}_reference")
    except Exception as e:  # compile or launch failure: the kernel is unusable here
        rel, error = math.nan, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return dict(ok=error is None, error=error,
                max_rel_err=None if math.isnan(rel) else rel, tolerance=tolerance,
                seconds=round(time.perf_counter() - start, 4),
                checked=time.strftime("%Y-%m-%dT%H:%M:%S"))


# ---------------------------------------------------------------------------
# Where it runs, and the cache
# ---------------------------------------------------------------------------
def check_enabled() -> bool:
    """False when MLX_FALCON_H1_KERNEL_CHECK=0 (read before each check)."""
    return os.environ.get("MLX_FALCON_H1_KERNEL_CHECK", "1").strip() != "0"


def gpu_name() -> Optional[str]:
    """The Metal GPU the kernels will run on, or None (no Metal, or the default
    device is the CPU: nothing to check)."""
    if not metal_available() or mx.default_device().type != mx.DeviceType.gpu:
        return None
    return _metal_device_name()


@functools.lru_cache(maxsize=None)
def _metal_device_name() -> str:
    try:
        info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    except Exception:  # pragma: no cover - MLX without device_info
        info = {}
    name = info.get("device_name") or "Metal GPU"
    arch = info.get("architecture")
    return f"{name} ({arch})" if arch else name


def cache_path() -> str:
    base = os.environ.get("MLX_FALCON_H1_CACHE_DIR")
    if not base:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        base = os.path.join(xdg, "mlx_falcon_h1")
    return os.path.join(base, CACHE_FILE)


@functools.lru_cache(maxsize=None)  # the dispatchers ask at every call
def device_key(gpu: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("mlx-falcon-h1")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree
        package = "unknown"
    return f"mlx-falcon-h1 {package} | mlx {mx.__version__} | {gpu}"


@functools.lru_cache(maxsize=None)
def source_digest(op: KernelOp) -> str:
    """8 hex digits of the kernel's Metal source: a fixed kernel is checked again
    even where the package version did not change (a source checkout)."""
    text = "".join(spec.get("header", "") + spec["source"] for spec in (op.spec, *op.more_specs))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _read_cache(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        if isinstance(data, dict) and data.get("format") == _FORMAT and isinstance(
                data.get("devices"), dict):
            return data
    except (OSError, ValueError):
        pass  # missing or unreadable: check again and rewrite it
    return {"format": _FORMAT, "devices": {}}


def cached_results(gpu: str) -> dict:
    """{check key: result record} in the cache file for `gpu` at this package and
    MLX version (what selfcheck reports)."""
    return _read_cache(cache_path())["devices"].get(device_key(gpu), {})


def _write_cache(path: str, device: str, key: str, record: dict) -> None:
    """Add one result; written to a temporary file beside the cache and moved into
    place, so a crash or a concurrent reader never sees half a file."""
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = _read_cache(path)  # re-read: another process may have added results
        data["devices"].setdefault(device, {})[key] = record
        fd, tmp = tempfile.mkstemp(prefix=".kernel_check.", dir=os.path.dirname(path))
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop the model: keep it in memory
        warnings.warn(f"mlx_falcon_h1: could not write the kernel check cache {path}: {e}",
                      RuntimeWarning, stacklevel=3)


_lock = threading.RLock()
_results: dict = {}  # (device, key) -> record, this process
_verdicts: dict = {}  # (op, *sizes) -> bool, this process (one GPU per process)
_warned: set = set()


def kernel_allowed(op: Union[KernelOp, str], sizes: dict) -> bool:
    """Whether `op`'s kernel may run at `sizes` on this device: the dispatchers'
    last condition. True without a GPU to check or with the check switched off."""
    gpu = gpu_name()
    if gpu is None:
        return True
    op = _op(op)
    fast_key = (op.name, *sizes.values())  # the hot path (every dispatch): one dict lookup
    verdict = _verdicts.get(fast_key)
    if verdict is not None:
        return verdict
    if not check_enabled():
        return True
    device, key = device_key(gpu), f"{describe(op, sizes)} (kernel {source_digest(op)})"
    record = _results.get((device, key))
    if record is None:
        with _lock:
            record = _results.get((device, key))
            if record is None:
                record = _lookup_or_check(op, sizes, device, key)
                if record is None:  # could not check now (see below): reference, this call
                    return False
                _results[(device, key)] = record
    if not record["ok"] and (device, key) not in _warned:
        _warned.add((device, key))
        _warn(op.name, key, gpu, record)
    _verdicts[fast_key] = record["ok"]
    return record["ok"]


def _lookup_or_check(op, sizes, device, key):
    path = cache_path()
    cached = _read_cache(path)["devices"].get(device, {}).get(key)
    if isinstance(cached, dict) and isinstance(cached.get("ok"), bool):
        return dict(cached, cached_in=path)
    record = run_check(op, sizes)
    if not record["ok"] and "function transformation" in (record["error"] or ""):
        return None  # called inside mx.vmap or similar, where nothing can be evaluated
    _write_cache(path, device, key, record)
    return record


def _warn(op, key, gpu, record):
    origin = (f" (result cached in {record['cached_in']} on {record.get('checked')}; delete that "
              "file to check again)") if "cached_in" in record else ""
    warnings.warn(
        f"mlx_falcon_h1: the Metal kernel {op} failed its check on this GPU ({gpu}) at "
        f"{key}: {record['error']}. It is turned off on this device for these sizes: the model "
        f"runs the pure-MLX reference path instead (same results, slower){origin}. "
        f"`{REPORT_COMMAND}` reports it; please file an issue with its output.",
        KernelCheckWarning, stacklevel=4)


def reset() -> None:
    """Forget this process's results and warnings (the cache file stays)."""
    with _lock:
        _results.clear()
        _verdicts.clear()
        _warned.clear()
