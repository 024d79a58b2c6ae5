"""Use an optimized BLAS for MLX's CPU backend on Linux.

The mlx[cpu] wheel links netlib's reference BLAS: float32 matmul runs at about
5 GFLOP/s on a 2-core x86 machine, about 90-190 with OpenBLAS. MLX binds its
BLAS symbols (cblas_sgemm, cblas_dgemm, cblas_cgemm) when mlx.core is imported,
looking in the global symbol namespace first, so a library loaded there before
that import takes precedence; one loaded after it does not (measured: no
change). This package's __init__ calls `prefer_optimized_blas()` first thing.
It does nothing on macOS (MLX uses Accelerate and Metal there) and nothing when
MLX_FALCON_H1_BLAS=0. In order, it uses:

1. MLX_FALCON_H1_BLAS=/path/to.so, a library exporting the CBLAS names
   (MLX_FALCON_H1_BLAS=scipy-openblas32 picks 3.);
2. the system's OpenBLAS (Debian/Ubuntu: apt install libopenblas0-pthread);
3. scipy-openblas32, a dependency of this package on Linux (PyPI, self-contained:
   no Fortran runtime needed). It prefixes its symbols (scipy_cblas_sgemm), so a
   three-function shim exporting the standard names is built once with g++ (the
   compiler MLX's own CPU compile uses) into ~/.cache/mlx_falcon_h1/blas/.

When mlx.core was imported first, the choice is already made: if the bundled
BLAS is what MLX got, `prefer_optimized_blas()` says so once, with the fix.
"""

import ctypes
import ctypes.util
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

# What MLX's CPU matmuls use in this process: "bundled", a library path, or a
# reason the choice could not be made. Benchmarks print it.
in_use = "bundled"

# The CBLAS functions MLX's CPU backend calls (nm -D libmlx.so), forwarded to
# scipy-openblas32's prefixed ones. Enums are ints; scipy-openblas32 has 32-bit
# integers, as MLX expects.
SHIM_SOURCE = """
#define FORWARD(T, name, S)                                                        \\
    void scipy_cblas_##name(int, int, int, int, int, int, S, const T*, int,        \\
                            const T*, int, S, T*, int);                            \\
    void cblas_##name(int o, int ta, int tb, int m, int n, int k, S alpha,         \\
                      const T* a, int lda, const T* b, int ldb, S beta, T* c,      \\
                      int ldc) {                                                   \\
        scipy_cblas_##name(o, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc); \\
    }
extern "C" {
FORWARD(float, sgemm, float)
FORWARD(double, dgemm, double)
FORWARD(void, cgemm, const void*)
}
"""


def _global_provider(symbol: str = "cblas_sgemm") -> Optional[str]:
    """The library that defines `symbol` in the global namespace, or None."""
    try:
        libc = ctypes.CDLL(None)
        address = ctypes.cast(getattr(libc, symbol), ctypes.c_void_p)
    except (OSError, AttributeError):
        return None

    class DlInfo(ctypes.Structure):
        _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                    ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]  # fmt: skip

    info = DlInfo()
    if not libc.dladdr(address, ctypes.byref(info)) or not info.fname:
        return "an optimized BLAS in the process"
    return os.path.realpath(info.fname.decode())


def _scipy_openblas_shim() -> Optional[str]:
    """The shim over scipy-openblas32 (built on first use), or None."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    lib_dir = scipy_openblas32.get_lib_dir()
    library = scipy_openblas32.get_library()
    tag = hashlib.sha256(f"{SHIM_SOURCE}{lib_dir}".encode()).hexdigest()[:16]
    folder = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mlx_falcon_h1" / "blas"
    shim = folder / f"libcblas_scipy_openblas-{tag}.so"
    if shim.exists():
        return str(shim)
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            source, out = Path(tmp) / "shim.cpp", Path(tmp) / shim.name
            source.write_text(SHIM_SOURCE)
            subprocess.run(
                [compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(out),
                 f"-L{lib_dir}", f"-l{library}", f"-Wl,-rpath,{lib_dir}"],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            os.replace(out, shim)  # atomic: concurrent imports never see half a file
    except (OSError, subprocess.SubprocessError):
        return None
    return str(shim)


def prefer_optimized_blas() -> str:
    global in_use
    choice = os.environ.get("MLX_FALCON_H1_BLAS", "")
    if not sys.platform.startswith("linux") or choice == "0":
        return in_use
    if "mlx.core" in sys.modules:
        provider = _global_provider()  # e.g. LD_PRELOAD, or loaded before mlx.core
        if provider is not None:
            in_use = provider
            return in_use
        in_use = "bundled (mlx.core was imported before mlx_falcon_h1)"
        warnings.warn(
            "MLX's CPU matmuls run on its bundled reference BLAS (~5 GFLOP/s, 20-40x "
            "slower than OpenBLAS) because mlx.core was imported before mlx_falcon_h1. "
            "Import mlx_falcon_h1 first, or start Python with "
            "LD_PRELOAD=/path/to/libopenblas.so.0.",
            stacklevel=3,
        )
        return in_use
    if choice == "scipy-openblas32":
        paths = [None]
    elif choice:
        paths = [choice]
    else:
        paths = [p for p in CANDIDATES if os.path.exists(p)]
        if not paths and (found := ctypes.util.find_library("openblas")):
            paths = [found]
        paths.append(None)
    for path in paths:  # None: scipy-openblas32 through the shim
        if path is None and (path := _scipy_openblas_shim()) is None:
            break
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        in_use = path
        break
    return in_use


def optimized() -> bool:
    """Whether MLX's CPU matmuls use something better than the bundled BLAS."""
    return not in_use.startswith("bundled")
