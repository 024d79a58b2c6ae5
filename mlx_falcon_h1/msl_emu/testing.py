"""Run the package's kernels in the emulator instead of on Metal.

    from mlx_falcon_h1.kernels import ssd_scan
    with emulated(ssd_scan, layout="padded"):
        y, state = ssd_scan.ssd_scan(...)      # the dispatcher, kernel path, emulated

Each kernel module keeps its built kernel in `_KERNEL` (None without Metal) and
its `mx.fast.metal_kernel` arguments in `KERNEL_SPEC`; inside the block
`_KERNEL` is the emulator's stand-in built from the same spec, so the module's
own wrapper, eligibility test and dispatcher run unchanged. A module with
further kernels (a two-pass op) names them `_KERNEL<suffix>`, each beside its
`KERNEL_SPEC<suffix>`; all are swapped, and the block yields each module's
`_KERNEL`.
"""

from contextlib import contextmanager

from .emulator import metal_kernel


def emulator_kernel(module, suffix: str = "", **options):
    """The emulator's version of a kernel module's kernel `_KERNEL<suffix>`, built
    from its `KERNEL_SPEC<suffix>` (options: see emulator.DEFAULTS)."""
    return metal_kernel(**getattr(module, "KERNEL_SPEC" + suffix), **options)


def kernel_suffixes(module) -> list:
    """"" for `_KERNEL`, then the suffix of each further `_KERNEL<suffix>` that has
    a `KERNEL_SPEC<suffix>`."""
    return [""] + sorted(name[len("_KERNEL"):] for name in vars(module)
                         if name.startswith("_KERNEL_") and hasattr(module, "KERNEL_SPEC" + name[7:]))


@contextmanager
def emulated(*modules, **options):
    saved = [(m, s, getattr(m, "_KERNEL" + s)) for m in modules for s in kernel_suffixes(m)]
    try:
        for m, s, _ in saved:
            setattr(m, "_KERNEL" + s, emulator_kernel(m, s, **options))
        yield [m._KERNEL for m in modules]
    finally:
        for m, s, k in saved:
            setattr(m, "_KERNEL" + s, k)


def gradients_through_kernel(module, op: str, inputs: dict, keys, loss):
    """(kernel's, reference's) gradients of loss(outputs) with respect to
    inputs[k] for k in keys: `op`, the dispatcher, run with the emulated kernel
    (which must be taken), and `op + "_reference"`. The kernels' gradients are
    their references' (with_reference_vjp), so the two must agree."""
    import mlx.core as mx

    def grads(fn):
        def f(*arrays):
            return loss(fn(**{**inputs, **dict(zip(keys, arrays))}))

        return mx.grad(f, argnums=tuple(range(len(keys))))(*[inputs[k] for k in keys])

    with emulated(module, schedules=("forward",)) as (kernel,):
        got = grads(getattr(module, op))
        assert kernel.last, f"{op} did not take the kernel"
    return got, grads(getattr(module, op + "_reference"))


def refuse_kernel(monkeypatch, module) -> None:
    """Make `module`'s kernel fail if called: for inputs its dispatcher must send
    to the reference."""

    def refuse(**kwargs):
        raise AssertionError("kernel called")

    monkeypatch.setattr(module, "_KERNEL", refuse)
