"""The kernels check themselves on the GPU they run on, and step aside if wrong.

Our Metal kernels are verified in an emulator, not on every Apple GPU. So the
first time a dispatcher is about to launch a kernel for a given set of mixer
sizes (heads, head dim, groups, state size, conv width, dtypes) on a Metal
device, it runs that kernel once on small random inputs of exactly those
sizes and compares it with its pure-MLX reference. A kernel that disagrees
beyond its dtype's tolerance (TOLERANCE), or fails to compile or launch, is
turned off for those sizes on this device: the dispatcher takes the reference
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
from typing import Optional

import mlx.core as mx
import numpy as np

from . import metal_available

REPORT_COMMAND = "python -m mlx_falcon_h1.selfcheck"
CACHE_FILE = "kernel_check.json"
_FORMAT = 1

# Bound on max |kernel - reference| / max |reference| per kernel and activation
# dtype; the same bounds as the emulator tests (tests/test_kernels_*.py).
TOLERANCE = {
    ("ssd_scan", mx.float32): 2e-5, ("ssd_scan", mx.float16): 2e-5,
    ("ssd_scan", mx.bfloat16): 2e-5,
    ("ssm_step", mx.float32): 2e-5, ("ssm_step", mx.float16): 2e-3,
    ("ssm_step", mx.bfloat16): 1e-2,
    ("causal_conv1d", mx.float32): 2e-6, ("causal_conv1d", mx.float16): 2.0**-10,
    ("causal_conv1d", mx.bfloat16): 2.0**-7,
}  # fmt: skip

# Check inputs: one sequence; prefill lengths that span more than one of the
# kernel's internal blocks (ssd_scan: 32-token chunks, conv: 16-token blocks),
# so the carry between blocks is part of the check.
_CHECK_LENGTH = {"ssd_scan": 40, "causal_conv1d": 20}


class KernelCheckWarning(RuntimeWarning):
    """A Metal kernel disagreed with its reference on this GPU and was turned off."""


def _dtype_name(dtype) -> str:
    return str(dtype).split(".")[-1]


def describe(op: str, sizes: dict) -> str:
    """'ssm_step H24 P128 G1 N256 K4 bfloat16/float32': the key of one check."""
    parts = [op]
    for field, letter in (("heads", "H"), ("head_dim", "P"), ("groups", "G"), ("n", "N"),
                          ("channels", "C"), ("width", "K")):
        if field in sizes:
            parts.append(f"{letter}{sizes[field]}")
    dtypes = _dtype_name(sizes["dtype"])
    if "wdtype" in sizes:
        dtypes += "/" + _dtype_name(sizes["wdtype"])
    return " ".join(parts + [dtypes])


def check_inputs(op: str, sizes: dict, batch: int = 1, length: Optional[int] = None, seed: int = 0):
    """Random inputs of `op`'s kernel signature at the given mixer sizes.

    sizes: ssd_scan: heads, head_dim, groups, n, dtype; causal_conv1d: channels,
    width, dtype, wdtype; ssm_step: heads, head_dim, groups, n, width, dtype, wdtype.
    dt spans fast- and slow-forgetting heads (A = -exp(A_log), A_log in [-5, 1.5]).
    """
    from .ssm_step import discretize

    rng = np.random.default_rng(seed)
    dtype, wdtype = sizes["dtype"], sizes.get("wdtype", mx.float32)
    length = length or _CHECK_LENGTH.get(op, 1)

    def normal(*shape, dt=mx.float32, scale=1.0):
        return mx.array((rng.standard_normal(shape) * scale).astype(np.float32)).astype(dt)

    if op == "causal_conv1d":
        c, k = sizes["channels"], sizes["width"]
        return dict(x=normal(batch, length, c, dt=dtype), weight=normal(c, k, dt=wdtype, scale=0.5),
                    bias=normal(c, dt=wdtype), state=normal(batch, k - 1, c, dt=dtype))
    h, p, g, n = sizes["heads"], sizes["head_dim"], sizes["groups"], sizes["n"]
    a_log = rng.uniform(-5.0, 1.5, h).astype(np.float32)
    if op == "ssd_scan":
        dt, A = discretize(normal(batch, length, h), normal(h), mx.array(a_log), (0.0, math.inf))
        return dict(x=normal(batch, length, h, p, dt=dtype), dt=dt, A=A,
                    B=normal(batch, length, g, n, dt=dtype), C=normal(batch, length, g, n, dt=dtype),
                    D=normal(h), state=normal(batch, h, p, n), chunk_size=32)
    if op == "ssm_step":
        c, k = h * p + 2 * g * n, sizes["width"]
        return dict(xBC=normal(batch, c, dt=dtype), dt=normal(batch, h, dt=dtype),
                    conv_state=normal(batch, k - 1, c, dt=dtype),
                    conv_weight=normal(c, k, dt=wdtype, scale=0.5), conv_bias=normal(c, dt=wdtype),
                    dt_bias=normal(h, dt=wdtype), A_log=mx.array(a_log).astype(wdtype),
                    D=normal(h, dt=wdtype), state=normal(batch, h, p, n),
                    time_step_limit=(0.0, math.inf), n_groups=g)
    raise ValueError(f"unknown kernel {op!r}; valid: ssd_scan, causal_conv1d, ssm_step")


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| over all outputs (nan if any output is not finite)."""
    worst, scale = 0.0, 0.0
    for o, r in zip(ours, ref):
        o, r = o.astype(mx.float32), r.astype(mx.float32)
        worst = max(worst, float(mx.abs(o - r).max()))
        scale = max(scale, float(mx.abs(r).max()))
    return worst / max(scale, 1e-30) if math.isfinite(worst) else math.nan


def _module(op: str):
    from . import conv1d, ssd_scan, ssm_step

    return {"ssd_scan": ssd_scan, "causal_conv1d": conv1d, "ssm_step": ssm_step}[op]


def run_check(op: str, sizes: dict) -> dict:
    """Run `op`'s kernel and reference once at `sizes`; a result record (never raises
    for a kernel failure: a compile or launch error is the record's `error`)."""
    module = _module(op)
    inputs = check_inputs(op, sizes)
    tolerance = TOLERANCE[(op, sizes["dtype"])]
    start = time.perf_counter()
    try:
        ours = getattr(module, op + "_kernel")(**inputs)
        mx.eval(ours)
        ref = getattr(module, op + "_reference")(**inputs)
        mx.eval(ref)
        rel = relative_error(ours, ref)
        error = None if rel <= tolerance else (
            f"max relative error {rel:.3g} > tolerance {tolerance:.3g} against {op}_reference")
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
def source_digest(op: str) -> str:
    """8 hex digits of the kernel's Metal source: a fixed kernel is checked again
    even where the package version did not change (a source checkout)."""
    spec = _module(op).KERNEL_SPEC
    return hashlib.sha256((spec.get("header", "") + spec["source"]).encode()).hexdigest()[:8]


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


def kernel_allowed(op: str, sizes: dict) -> bool:
    """Whether `op`'s kernel may run at `sizes` on this device: the dispatchers'
    last condition. True without a GPU to check or with the check switched off."""
    gpu = gpu_name()
    if gpu is None:
        return True
    fast_key = (op, *sizes.values())  # the hot path (every dispatch): one dict lookup
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
        _warn(op, key, gpu, record)
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
