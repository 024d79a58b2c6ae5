"""Mamba2 building blocks of Falcon-H1.

One module per op. Each holds the pure-MLX reference implementation
(`foo_reference`), which runs on every MLX backend and is the oracle the custom
kernels are tested against; a custom Metal kernel with the same signature
(`foo_kernel`); and the dispatcher the model calls (`foo`), which takes the
kernel when Metal is there and the call fits it, and the reference otherwise.

Set MLX_FALCON_H1_KERNELS=0 to make every dispatcher take the reference path.
On a Metal GPU each kernel is also checked once against its reference at the
model's own sizes before first use, and turned off there if it disagrees
(runtime_check; MLX_FALCON_H1_KERNEL_CHECK=0 skips the check). Each op module
with a Metal kernel exports one `KERNEL_OP` (descriptor.py: its Metal spec,
kernel, reference, random inputs and tolerance), which the run-time check and
selfcheck take. Imports run one way: op modules -> runtime_check ->
descriptor, and selfcheck above them all.
Off a Mac the kernels are verified in the project's Metal emulator
(mlx_falcon_h1.msl_emu); `python -m mlx_falcon_h1.selfcheck` checks them on
the GPU of the machine it runs on.
"""

import os


def kernels_enabled() -> bool:
    """False when the environment says MLX_FALCON_H1_KERNELS=0 (read at each call)."""
    return os.environ.get("MLX_FALCON_H1_KERNELS", "1").strip() != "0"


def metal_available() -> bool:
    """Whether MLX has a Metal device here (False on Linux, whatever is installed)."""
    import mlx.core as mx

    try:
        return bool(mx.metal.is_available())
    except Exception:  # pragma: no cover - MLX builds without the metal module
        return False


def build_metal_kernel(spec: dict):
    """mx.fast.metal_kernel(**spec), built once at import (MLX compiles it on first
    use), or None without Metal. Tests build the same spec in the emulator."""
    if not metal_available():
        return None
    import mlx.core as mx

    return mx.fast.metal_kernel(**spec)


def with_reference_vjp(kernel_fn, reference_fn):
    """kernel_fn, differentiable: its vjp is the reference's (Metal kernels have none).

    Both take the same arrays and return the same tuple; training through a
    kernel therefore gets exactly the reference path's gradients.
    """
    import mlx.core as mx

    fn = mx.custom_function(kernel_fn)

    @fn.vjp
    def _vjp(primals, cotangents, outputs):
        _, grads = mx.vjp(reference_fn, list(primals), list(cotangents))
        return tuple(grads)

    return fn
