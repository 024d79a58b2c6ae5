"""The memory planner against MLX's measured peak: a random Falcon-H1 0.5B (float32),
prompts of 2K-16K tokens prefilled in steps of 2048 through our cache, as mlx-lm's
generate_step does.

    python examples/memory_planner_check.py                      # 2048 8192 16384
    python examples/memory_planner_check.py --tokens 2048 4096 --json out.json

Prints the planner's estimate, the measured peak (weights + what the prefill
allocated, from mx.get_peak_memory) and the error, and writes JSON
(examples/memory_planner_check_0.5B.json by default) after each length. Slow on
a 2-core CPU (~2 minutes per 2048-token step at 16K); each length runs in a
fresh model so the lengths do not share allocations.
"""

import argparse
import json
import platform
import time
from pathlib import Path

import mlx_falcon_h1  # noqa: F401  (first: picks the BLAS)

import mlx.core as mx  # noqa: E402

from mlx_falcon_h1 import memory, prefill_peak  # noqa: E402
from mlx_falcon_h1.model import ModelArgs  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.5B", choices=list(memory.RELEASED))
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 16384])
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--json", default=None)
    a = parser.parse_args()
    out = Path(a.json or Path(__file__).with_name(f"memory_planner_check_{a.shape}.json"))
    args = ModelArgs.from_dict(memory.RELEASED[a.shape])
    rows = []
    print(f"{a.shape} (random weights, float32), prefill step {a.prefill_step_size}, "
          f"MLX {mx.__version__}, {platform.machine()} CPU")
    print(f"{'tokens':>7} {'weights':>9} {'cache':>9} {'measured':>9} {'estimate':>9} "
          f"{'error':>7} {'above weights: meas / est':>27} {'time':>6}")
    for tokens in a.tokens:
        tic = time.perf_counter()
        r = prefill_peak.check(args, tokens, a.prefill_step_size)
        r["seconds"] = round(time.perf_counter() - tic, 1)
        above_est = r["estimate"] - r["weights"]
        r["error_above_weights"] = (above_est - r["peak_above_weights"]) / r["peak_above_weights"]
        rows.append(r)
        mb = lambda n: f"{n / 2**20:8.0f}M"  # noqa: E731
        print(f"{tokens:>7} {mb(r['weights'])} {mb(r['cache'])} {mb(r['peak'])} {mb(r['estimate'])} "
              f"{r['error']:+7.1%} {mb(r['peak_above_weights'])} / {mb(above_est)} "
              f"({r['error_above_weights']:+.1%}) {r['seconds']:5.0f}s", flush=True)
        out.write_text(json.dumps(dict(
            shape=a.shape, dtype="float32", prefill_step=a.prefill_step_size,
            mlx=mx.__version__, machine=platform.machine(), rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
