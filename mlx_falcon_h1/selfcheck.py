"""Check this machine's Metal kernels against their pure-MLX references.

    python -m mlx_falcon_h1.selfcheck            # on a Mac: GPU errors and timings
    python -m mlx_falcon_h1.selfcheck --emulate  # also (or elsewhere: only) the emulator

On Apple Silicon, runs each custom kernel (ssd_scan, causal_conv1d, ssm_step,
mixer_step, gated_norm, rope_qk, residual_rms_norm, quantized_decode_attention)
and its reference on the GPU at Falcon-H1-7B sizes, in float32 and bfloat16,
and prints the largest error and the time per call of each. Elsewhere there is
no Metal: it says what it could not check and, if g++ is there, runs each
kernel's exact Metal source in the project's emulator (mlx_falcon_h1.msl_emu)
at small sizes instead. Exit status 1 if any check fails.
"""

import argparse
import math
import platform
import time

import mlx.core as mx

from .kernels import (conv1d, gated_norm, kernels_enabled, metal_available, mixer_step, quantized_attention,
                      residual_norm, rope, runtime_check, ssd_scan, ssm_step)
from .kernels.descriptor import KernelOp, output_errors

OPS = (ssd_scan.KERNEL_OP, conv1d.KERNEL_OP, ssm_step.KERNEL_OP, mixer_step.KERNEL_OP,
       gated_norm.KERNEL_OP, rope.KERNEL_OP, residual_norm.KERNEL_OP, quantized_attention.KERNEL_OP)
# Falcon-H1-7B's mixer: 24 heads of 128, state 256, one group, conv width 4.
GPU_SIZES = dict(batch=1, length=2048, heads=24, head_dim=128, groups=1, n=256, width=4)
EMULATOR_SIZES = dict(batch=2, length=37, heads=2, head_dim=32, groups=1, n=32, width=4)
# The scan reference's chunk here: the model's default (ModelArgs.mamba_chunk_size),
# so its time is the one the model sees (the kernel has its own 32-token chunks).
REFERENCE_CHUNK = 256


def _inputs(op: KernelOp, dtype, batch, length, heads, head_dim, groups, n, width, seed=0):
    """op's random inputs (its make_inputs) for a mixer of these sizes; the residual
    norm's D is H*P (7B: d_ssm = hidden size = 3072); the quantized attention's
    query heads are H, 6 to a K/V head where H allows (7B's grouping), over a
    4-bit bulk of `length` keys and a 37-key tail, with the head dim rounded up to
    a multiple of 32 (MLX's smallest quantization group)."""
    sizes = dict(heads=heads, head_dim=head_dim, groups=groups, n=n, width=width, dtype=dtype,
                 channels=heads * head_dim + 2 * groups * n, dim=heads * head_dim)
    if op.name == "quantized_decode_attention":
        sizes["kv_heads"], sizes["head_dim"] = _quantized_attention_heads(heads, head_dim)
    inputs = op.make_inputs(sizes, batch=batch, length=length, seed=seed)
    return dict(inputs, chunk_size=REFERENCE_CHUNK) if "chunk_size" in inputs else inputs


def _quantized_attention_heads(heads, head_dim):
    """(K/V heads, head dim) of the quantized attention's check at a mixer's sizes."""
    return heads // 6 if heads % 6 == 0 else heads, 32 * max(1, math.ceil(head_dim / 32))


def _timed(fn, reps):
    out = fn()
    mx.eval(out)  # first call compiles
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
        mx.eval(out)
    return out, (time.perf_counter() - start) / reps


def _describe(sizes, op: KernelOp):
    s = sizes
    if op.name in ("ssm_step", "mixer_step"):
        return f"B{s['batch']} H{s['heads']} P{s['head_dim']} G{s['groups']} N{s['n']}"
    if op.name == "rope_qk":  # the attention's heads, taken as many as the mixer's here
        return f"B{s['batch']} L{s['length']} H{s['heads']} D{s['head_dim']}"
    if op.name == "gated_norm":  # one token's H*P mixer channels
        return f"B{s['batch']} D{s['heads'] * s['head_dim']} G{s['groups']}"
    if op.name == "quantized_decode_attention":  # a decode query over `length` quantized keys
        kv_heads, head_dim = _quantized_attention_heads(s['heads'], s['head_dim'])
        return f"B{s['batch']} T{s['length']} H{s['heads']}/{kv_heads} D{head_dim}"
    if op.name == "residual_rms_norm":
        return f"B{s['batch']} L{s['length']} D{s['heads'] * s['head_dim']}"
    if op.name == "causal_conv1d":
        return f"B{s['batch']} L{s['length']} C{s['heads'] * s['head_dim'] + 2 * s['groups'] * s['n']}"
    return f"B{s['batch']} L{s['length']} H{s['heads']} P{s['head_dim']} G{s['groups']} N{s['n']}"


def check_gpu(sizes=GPU_SIZES, dtypes=(mx.float32, mx.bfloat16), reps=10, out=print, ops=OPS):
    """Each kernel vs its reference on the GPU; returns True if all are within tolerance."""
    ok = True
    out(f"{'kernel':28}{'shape':30}{'dtype':10}{'max|err|':>10}{'rel err':>10}"
        f"{'kernel ms':>11}{'reference ms':>14}{'speedup':>9}  result")
    for op in ops:
        for dtype in dtypes:
            inp = _inputs(op, dtype, **sizes)
            ours, t_kernel = _timed(lambda: op.kernel(**inp), reps)
            ref, t_ref = _timed(lambda: op.reference(**inp), reps)
            worst, rel = output_errors(ours, ref)
            good = rel <= op.tolerance[dtype]
            ok &= good
            out(f"{op.name:28}{_describe(sizes, op):30}{str(dtype).split('.')[-1]:10}{worst:10.2e}"
                f"{rel:10.2e}{t_kernel * 1e3:11.3f}{t_ref * 1e3:14.3f}{t_ref / t_kernel:8.1f}x"
                f"  {'ok' if good else 'FAILED'}")
    return ok


def check_emulator(sizes=EMULATOR_SIZES, dtypes=(mx.float32, mx.bfloat16), out=print, ops=OPS):
    """Each kernel's Metal source run in the CPU emulator vs its reference."""
    from .msl_emu.testing import emulated

    ok = True
    out(f"{'kernel':28}{'shape':30}{'dtype':10}{'max|err|':>10}{'rel err':>10}{'emulated s':>12}"
        "  result")
    for op in ops:
        for dtype in dtypes:
            inp = _inputs(op, dtype, **sizes)
            start = time.perf_counter()
            try:
                with emulated(op.module):
                    ours = op.kernel(**inp)
                    mx.eval(ours)
                seconds = time.perf_counter() - start
                worst, rel = output_errors(ours, op.reference(**inp))
                good, note = rel <= op.tolerance[dtype], ""
            except Exception as e:  # an emulator finding: report it, check the rest
                seconds, worst, rel, good = time.perf_counter() - start, math.nan, math.nan, False
                note = f"\n    {type(e).__name__}: {str(e).splitlines()[0]}"
            ok &= good
            out(f"{op.name:28}{_describe(sizes, op):30}{str(dtype).split('.')[-1]:10}{worst:10.2e}"
                f"{rel:10.2e}{seconds:12.2f}  {'ok' if good else 'FAILED'}{note}")
    return ok


def report_runtime_checks(out=print) -> bool:
    """The run-time check's cached results for this GPU (kernels.runtime_check):
    which kernels the models run here turned off, and why. False if any failed."""
    gpu = runtime_check.gpu_name()
    path = runtime_check.cache_path()
    entries = runtime_check.cached_results(gpu)
    if not entries:
        out(f"Run-time check: no results yet for this GPU and version ({path}); a model checks "
            "each kernel at its own sizes before first use.")
        return True
    out(f"Run-time check results for this GPU ({path}; delete it to check again):")
    for key, e in sorted(entries.items()):
        status = "ok" if e["ok"] else f"FAILED, turned off: {e['error']}"
        out(f"  {key:62} {e.get('seconds', 0) * 1e3:8.1f} ms  {status}")
    return all(e["ok"] for e in entries.values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_falcon_h1.selfcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulate", action="store_true",
                        help="also run the emulator check (always run when there is no Metal)")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per kernel (GPU)")
    args = parser.parse_args(argv)

    print(f"mlx-falcon-h1 selfcheck: mlx {mx.__version__}, {platform.system()} {platform.machine()}")
    ok = True
    if not kernels_enabled():
        print("MLX_FALCON_H1_KERNELS=0: the model runs the reference path; checking the "
              "kernels anyway.")
    if metal_available():
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
        print(f"GPU: {info.get('architecture', 'Metal device')}; sizes of Falcon-H1-7B's mixer")
        ok &= check_gpu(reps=args.reps)
        ok &= report_runtime_checks()
    else:
        print("NOT CHECKED: Metal is not available here, so the kernels could not run on a GPU:\n"
              "  their results on Apple GPUs and their speed are unverified on this machine.\n"
              "  The model runs the pure-MLX reference path here. Run this command on an Apple\n"
              "  Silicon Mac to check the GPU.")
    if args.emulate or not metal_available():
        from . import msl_emu

        if msl_emu.available():
            print("Emulator check: each kernel's exact Metal source, compiled as C++ and run on\n"
                  "the CPU with race, bounds and barrier checks (small sizes; not a GPU timing).")
            ok &= check_emulator()
        else:
            print("NOT CHECKED: no g++ on PATH, so the Metal emulator could not run either.")
    print("selfcheck: " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    from .cli import run

    run(main)
