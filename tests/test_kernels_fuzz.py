"""Seeded random shapes for every kernel, for a fixed time budget, in the emulator.

Each case draws a kernel, sizes (batch, length, heads, head dim, groups, state
size, conv width, hidden size), activation and weight dtypes and an input layout, runs the
dispatcher with the emulated kernel and compares with the reference. Shapes the
kernel does not take (e.g. a head dim that is not a multiple of 8 for the scan)
must go to the reference and still be right. The sequence of cases is fixed by
the seed; how many run depends on the machine (the budget is wall time, and the
first cases pay for compiling each template instantiation).

    MLX_FALCON_H1_FUZZ_SECONDS=600 MLX_FALCON_H1_FUZZ_SEED=7 python -m pytest tests/test_kernels_fuzz.py
"""

import os
import random
import time

import mlx.core as mx
import pytest

from mlx_falcon_h1 import msl_emu
from mlx_falcon_h1.kernels import (conv1d, gated_norm, mixer_step, quantized_attention, residual_norm,
                                   rope, runtime_check, ssd_scan, ssm_step)
from mlx_falcon_h1.msl_emu.testing import emulated

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

BUDGET_S = float(os.environ.get("MLX_FALCON_H1_FUZZ_SECONDS", "15"))
SEED = int(os.environ.get("MLX_FALCON_H1_FUZZ_SEED", "0"))
MODULES = {"ssd_scan": ssd_scan, "causal_conv1d": conv1d, "ssm_step": ssm_step,
           "mixer_step": mixer_step, "rope_qk": rope, "residual_rms_norm": residual_norm,
           "gated_norm": gated_norm, "quantized_decode_attention": quantized_attention}
DTYPES = [mx.float32, mx.float16, mx.bfloat16]


def draw(rng):
    """One case: (op, sizes, batch, length, layout). Small enough to run in ~1 s."""
    op = rng.choice(list(MODULES))
    groups = rng.choice([1, 1, 2, 3])
    heads = groups * rng.randint(1, 3)
    # Mostly multiples of 8 (what the scan takes), sometimes not (reference path).
    head_dim = rng.choice([8, 16, 24, 32, 40, 64, 8 * rng.randint(1, 17), rng.randint(1, 70)])
    n = rng.choice([8, 16, 32, 64, 128, 256, 8 * rng.randint(1, 32), rng.randint(1, 260)])
    width = rng.choice([4, 4, 2, 3, rng.randint(2, 8)])
    dtype, wdtype = rng.choice(DTYPES), rng.choice(DTYPES)
    sizes = dict(heads=heads, head_dim=head_dim, groups=groups, n=n, width=width, dtype=dtype,
                 wdtype=wdtype, channels=heads * head_dim + 2 * groups * n,
                 norm=rng.choice(mixer_step.NORMS), out_dtype=rng.choice([dtype, mx.float32]),
                 # out_proj's fused input: attention's output first (widths up to 20 x 128)
                 prefix=rng.choice([0, 0, rng.randint(1, 64), rng.randint(1, 2560)]),
                 prefix_dtype=rng.choice(DTYPES))
    if op == "rope_qk":  # attention heads: query heads a multiple of the key heads; D even
        kv_heads = rng.choice([1, 2, 4])
        sizes.update(heads=kv_heads * rng.randint(1, 6), kv_heads=kv_heads,
                     head_dim=rng.choice([16, 64, 128, 2 * rng.randint(1, 80)]))
    if op == "residual_rms_norm":  # the hidden size; a residual of h's dtype, another or none
        sizes.update(dim=rng.choice([64, 1024, 1280, 3072, rng.randint(1, 4200)]),
                     delta=rng.choice([dtype, dtype, None, rng.choice(DTYPES)]),
                     out_dtype=rng.choice([dtype, mx.float32, mx.bfloat16]))
    if op == "gated_norm":  # d = H*P channels in G groups; a gate (norm first) or none
        sizes.update(dim=groups * rng.choice([8, 1536, 3072, rng.randint(1, 2100)]),
                     gate=rng.choice([dtype, None, rng.choice(DTYPES)]), wdtype=mx.float32)
    if op == "quantized_decode_attention":  # a decode query over a quantized bulk + float tail
        kv_heads = rng.choice([1, 2, 4])
        head_dim = rng.choice([32, 64, 128, 32 * rng.randint(1, 8)])
        group_size = rng.choice([g for g in (32, 64, 128) if head_dim % g == 0])
        bulk_capacity = rng.choice([0, 1, 64, 256, rng.randint(1, 400)])
        tail_capacity = rng.choice([0, 16, 256, rng.randint(1, 300)])
        bulk_len = rng.choice([0, bulk_capacity, rng.randint(0, bulk_capacity)])
        tail_len = rng.choice([0, tail_capacity, rng.randint(0, tail_capacity)])
        if bulk_len + tail_len == 0:  # one real key at least
            bulk_len, tail_len = (1, 0) if bulk_capacity else (0, max(tail_capacity, 1))
            tail_capacity = max(tail_capacity, tail_len)
        # mostly what the kernel takes (bits 2/4/8, R * D/32 <= 64); sometimes not
        sizes.update(heads=kv_heads * rng.choice([1, 2, 5, 6, rng.randint(1, 20)]),
                     kv_heads=kv_heads, head_dim=head_dim,
                     bits=rng.choice([4, 4, 8, 8, 2, rng.choice([3, 5, 6])]),
                     group_size=group_size, bulk_capacity=bulk_capacity, bulk_len=bulk_len,
                     tail_capacity=tail_capacity, tail_len=tail_len)
    keep = {"ssd_scan": ("heads", "head_dim", "groups", "n", "dtype"),
            "causal_conv1d": ("channels", "width", "dtype", "wdtype"),
            "ssm_step": ("heads", "head_dim", "groups", "n", "width", "dtype", "wdtype"),
            "mixer_step": ("heads", "head_dim", "groups", "n", "width", "dtype", "wdtype", "norm",
                           "out_dtype", "prefix", "prefix_dtype"),
            "rope_qk": ("heads", "kv_heads", "head_dim", "dtype"),
            "residual_rms_norm": ("dim", "dtype", "delta", "wdtype", "out_dtype"),
            "gated_norm": ("dim", "groups", "dtype", "gate", "wdtype", "out_dtype", "prefix",
                           "prefix_dtype"),
            "quantized_decode_attention": ("heads", "kv_heads", "head_dim", "bits", "group_size",
                                           "dtype", "bulk_capacity", "bulk_len", "tail_capacity",
                                           "tail_len")}[op]
    sizes = {k: sizes[k] for k in keep}
    one_token = op in ("ssm_step", "mixer_step", "quantized_decode_attention")
    length = 1 if one_token else rng.choice([1, 2, 7, 16, 31, 32, 33, rng.randint(1, 70)])
    return op, sizes, rng.randint(1, 3), length, rng.choice(["given", "contiguous", "padded"])


def run_case(op, sizes, batch, length, layout, seed):
    module = MODULES[op]
    inputs = runtime_check.check_inputs(op, sizes, batch=batch, length=length, seed=seed)
    # A mixer with the norm finishes it in gated_norm's kernel.
    followers = [gated_norm] if op == "mixer_step" else []
    with emulated(module, *followers, schedules=("forward", "random:1"), layout=layout) as kernels:
        ours = getattr(module, op)(**inputs)
        mx.eval(ours)
        took_kernel = bool(kernels[0].last)
    ref = getattr(module, op + "_reference")(**inputs)
    rel = runtime_check.relative_error(ours, ref)
    # The scan's tolerance does not depend on the dtype (float32 outputs from
    # exactly representable inputs); the others' follow the activation dtype
    # (residual_rms_norm's: the coarser of its sum's and its output's).
    assert rel <= module.KERNEL_OP.tolerance_at(sizes), rel
    if op in ("mixer_step", "gated_norm"):  # its output on its own scale too (the state's can hide it)
        n_prefix = sizes["prefix"]  # the prefix: exact (one multiply, one rounding), then the rest
        out, out_ref = (ours[0], ref[0]) if op == "mixer_step" else (ours, ref)
        assert mx.array_equal(out[:, :n_prefix], out_ref[:, :n_prefix]).item()
        out_rel = runtime_check.relative_error([out[:, n_prefix:]], [out_ref[:, n_prefix:]])
        tolerance = max(runtime_check.TOLERANCE[(op, d)] for d in (sizes["dtype"], sizes["out_dtype"]))
        assert out_rel <= tolerance, out_rel
    return took_kernel


def test_random_shapes_for_a_fixed_budget():
    rng = random.Random(SEED)
    start, cases, kernel_cases = time.perf_counter(), 0, 0
    while time.perf_counter() - start < BUDGET_S:
        case = draw(rng)
        try:
            kernel_cases += run_case(*case, seed=cases)
        except Exception as e:
            raise AssertionError(f"fuzz case {cases} (seed {SEED}) failed: {case}: {e}") from e
        cases += 1
    print(f"\nkernel fuzz: {cases} cases ({kernel_cases} through a kernel) in "
          f"{time.perf_counter() - start:.1f} s, seed {SEED}")
    assert cases >= 1 and (cases < 4 or kernel_cases >= 1)
