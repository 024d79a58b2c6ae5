"""What the run-time kernel check (mlx_falcon_h1.kernels.runtime_check) costs, per model.

    python examples/runtime_check_cost.py                 # reference side, this machine
    python examples/runtime_check_cost.py --emulate       # + the kernels in the emulator
    python examples/runtime_check_cost.py --json cost.json

On a Mac the check runs once per kernel and model shape: it draws small random
inputs at the model's sizes, runs the kernel once (whose Metal library the first
real call would compile anyway) and the pure-MLX reference once, and compares.
This prints, for the shipped model's and released models' mixer shapes, the
time of everything but the kernel launch (inputs + reference, measured here on
the default device) and, with --emulate, the emulated kernel's time (the
emulator runs every GPU thread on one CPU core: it says nothing about a GPU's
speed, only that the check runs end to end).
"""

import argparse
import json
import sys
import time

import mlx.core as mx

from mlx_falcon_h1.kernels import conv1d, runtime_check, ssd_scan, ssm_step

SHAPES = {  # (H, P, N, G, K), as tests/test_kernels_released_shapes.py
    "shipped tiny": (8, 32, 32, 1, 4),
    "0.5B": (24, 64, 128, 1, 4),
    "7B": (24, 128, 256, 1, 4),
    "34B": (32, 128, 256, 2, 4),
}
MODULES = {"ssd_scan": ssd_scan, "causal_conv1d": conv1d, "ssm_step": ssm_step}


def sizes_for(op, h, p, n, g, k, dtype):
    if op == "causal_conv1d":
        return dict(channels=h * p + 2 * g * n, width=k, dtype=dtype, wdtype=mx.float32)
    if op == "ssd_scan":
        return dict(heads=h, head_dim=p, groups=g, n=n, dtype=dtype)
    return dict(heads=h, head_dim=p, groups=g, n=n, width=k, dtype=dtype, wdtype=mx.float32)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--emulate", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    dtype = mx.bfloat16
    rows = []
    print(f"device {mx.default_device()}, mlx {mx.__version__}, {dtype}")
    print("| model | kernel | inputs + reference ms | emulated kernel s |\n|---|---|---|---|")
    for model, shape in SHAPES.items():
        for op, module in MODULES.items():
            sizes = sizes_for(op, *shape, dtype)
            ref_fn = getattr(module, op + "_reference")
            mx.eval(ref_fn(**runtime_check.check_inputs(op, sizes, seed=1)))  # warm-up
            start = time.perf_counter()
            inputs = runtime_check.check_inputs(op, sizes)
            mx.eval(ref_fn(**inputs))
            ref_ms = (time.perf_counter() - start) * 1e3
            emulated = None
            if args.emulate:
                from mlx_falcon_h1.msl_emu.testing import emulated as emulate

                with emulate(module, schedules=("forward",), track_races=False):
                    start = time.perf_counter()
                    record = runtime_check.run_check(op, sizes)
                    emulated = time.perf_counter() - start
                assert record["ok"], record
            rows.append(dict(model=model, kernel=op, shape=runtime_check.describe(op, sizes),
                             inputs_and_reference_ms=round(ref_ms, 2), emulated_check_s=emulated))
            em = "" if emulated is None else f"{emulated:.2f}"
            print(f"| {model} | {op} | {ref_ms:.1f} | {em} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(mx.default_device()), mlx=mx.__version__, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
