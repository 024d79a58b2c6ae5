"""msl_emu: run `mx.fast.metal_kernel` bodies on a CPU, under checks.

    from mlx_falcon_h1.msl_emu import metal_kernel
    k = metal_kernel(name=..., input_names=[...], output_names=[...], source=BODY)
    outs = k(inputs=[...], output_shapes=[...], output_dtypes=[...],
             grid=(gx, gy, gz), threadgroup=(tx, ty, tz), template=[("T", mx.float32)])

Same constructor and call as `mx.fast.metal_kernel`, so a kernel wrapper runs
unchanged against either. The Metal source is generated exactly as MLX does
(codegen.py; checked byte for byte against the installed MLX), compiled as
C++20 against msl_emu.h with g++, and every threadgroup runs as fibers, once
per thread schedule. Checked: barriers (divergent, skipped by an early return),
simd/quad collectives and simdgroup_matrix ops (divergent, partial groups),
races on outputs and threadgroup memory, out-of-bounds indexing through buffer
parameters, reads of never-written outputs, threadgroup size and memory limits,
and results that depend on the schedule. `lint` flags C++ that Metal rejects.

Needs g++ >= 12 (C++20). Compiled kernels are cached in $MSL_EMU_CACHE
(default: ~/.cache/mlx_falcon_h1/msl_emu).
"""

import shutil

from .codegen import generate_metal_source, type_string
from .emulator import DEFAULTS, STATS, MSLEmuError, cache_dir, metal_kernel
from .lint import lint


def available() -> bool:
    """Whether a C++ compiler for the emulator is on PATH."""
    from .emulator import CXX

    return shutil.which(CXX) is not None


__all__ = [
    "DEFAULTS",
    "MSLEmuError",
    "STATS",
    "available",
    "cache_dir",
    "generate_metal_source",
    "lint",
    "metal_kernel",
    "type_string",
]
