"""Keep freed memory in the process for MLX's CPU backend on Linux (glibc).

MLX's CPU backend takes every array from malloc. With glibc's defaults, blocks
above a dynamic threshold (128 KB at first) are fresh mmaps, and memory freed
at the top of a heap goes back to the kernel; either way the next array of
that size starts on untouched pages, and the first write to each page is a
page fault. On this project's 2-core Linux machine that made large elementwise
ops 4-5x slower than their arithmetic: a fused exp over a 16 MB array ran at
~10 ns per element with fresh pages, ~2.4 with reused ones; one 0.5B layer's
conv at 2048 tokens 57 -> 18 ms, its SSD scan 189 -> 65 ms.

`keep_freed_memory()` (called from this package's __init__) sets, with
mallopt: blocks up to MMAP_THRESHOLD come from the heap (larger ones, such as
weight matrices, stay mmaps that return to the kernel when freed), and up to
TRIM_THRESHOLD bytes of free memory at a heap's top stay in the process for
the next arrays. It does nothing off Linux/glibc and nothing when
MLX_FALCON_H1_MALLOC=0. The cost: after a long prompt the process keeps up to
TRIM_THRESHOLD of freed memory resident, as MLX's own buffer cache does on Metal.
"""

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 1 << 30

# "glibc defaults", "kept (mmap threshold 32 MiB, trim threshold 1024 MiB)" or
# why nothing was set. Benchmarks print it.
in_use = "glibc defaults"


def keep_freed_memory() -> str:
    global in_use
    if not sys.platform.startswith("linux") or os.environ.get("MLX_FALCON_H1_MALLOC") == "0":
        return in_use
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        in_use = "system defaults (no mallopt)"
        return in_use
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        in_use = f"kept (mmap threshold {MMAP_THRESHOLD >> 20} MiB, trim threshold {TRIM_THRESHOLD >> 20} MiB)"
    return in_use
