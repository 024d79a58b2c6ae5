"""Run the package's kernels in the emulator instead of on Metal.

    from mlx_falcon_h1.kernels import ssd_scan
    with emulated(ssd_scan, layout="padded"):
        y, state = ssd_scan.ssd_scan(...)      # the dispatcher, kernel path, emulated

Each kernel module keeps its built kernel in `_KERNEL` (None without Metal) and
its `mx.fast.metal_kernel` arguments in `KERNEL_SPEC`; inside the block
`_KERNEL` is the emulator's stand-in built from the same spec, so the module's
own wrapper, eligibility test and dispatcher run unchanged.
"""

from contextlib import contextmanager

from .emulator import metal_kernel


def emulator_kernel(module, **options):
    """The emulator's version of a kernel module's kernel (options: see emulator.DEFAULTS)."""
    return metal_kernel(**module.KERNEL_SPEC, **options)


@contextmanager
def emulated(*modules, **options):
    saved = [m._KERNEL for m in modules]
    try:
        for m in modules:
            m._KERNEL = emulator_kernel(m, **options)
        yield [m._KERNEL for m in modules]
    finally:
        for m, k in zip(modules, saved):
            m._KERNEL = k
