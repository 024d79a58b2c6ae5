"""Use an optimized BLAS for MLX's CPU backend on Linux, when one is installed.

The mlx[cpu] wheel links netlib's reference BLAS: float32 matmul runs at about
5 GFLOP/s on a 2-core x86 machine, about 90 with OpenBLAS. MLX resolves its BLAS
symbols when mlx.core is first imported, so a library loaded into the global
symbol namespace before that import takes precedence. This package's __init__
calls `prefer_optimized_blas()` first thing; it does nothing on macOS (MLX uses
Accelerate and Metal there), nothing when mlx.core is already imported, and
nothing when MLX_FALCON_H1_BLAS=0.

MLX_FALCON_H1_BLAS=0           keep MLX's bundled BLAS
MLX_FALCON_H1_BLAS=/path/to.so use that library
(unset)                        the system OpenBLAS if there is one
                               (Debian/Ubuntu: apt install libopenblas0-pthread)
"""

import ctypes
import ctypes.util
import os
import sys

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

# What MLX's CPU matmuls use in this process: "bundled", a library path, or a
# reason the choice could not be made. Benchmarks print it.
in_use = "bundled"


def prefer_optimized_blas() -> str:
    global in_use
    choice = os.environ.get("MLX_FALCON_H1_BLAS", "")
    if not sys.platform.startswith("linux") or choice == "0":
        return in_use
    if "mlx.core" in sys.modules:
        in_use = "bundled (mlx.core was imported before mlx_falcon_h1)"
        return in_use
    paths = [choice] if choice else [p for p in CANDIDATES if os.path.exists(p)]
    if not paths and (found := ctypes.util.find_library("openblas")):
        paths = [found]
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        in_use = path
        break
    return in_use


def optimized() -> bool:
    """Whether prefer_optimized_blas() put a library in front of the bundled one."""
    return not in_use.startswith("bundled")
