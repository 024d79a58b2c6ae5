"""Quantized prefill and evaluation on the CPU: dequantize + BLAS vs MLX's quantized matmul.

    python examples/quantized_prefill_cpu.py [--shape 0.5B] [--layers 2] [--bits 4]
        [-p 512 2048] [--trials 2] [--eval-tokens 512] [--json OUT]

Builds a random model of a released shape (mlx_falcon_h1.benchmark's helper)
with --layers layers, quantizes it in memory (nn.quantize, affine, group 64,
--bits; --mode for the fp modes) and times, in one process, alternating run by
run: prefill (the benchmark's run_once, prompt only) and evaluation
(mlx_falcon_h1.evaluate.perplexity over random tokens, every row's logits) with
linear.py's dequantize + BLAS path on and off (MLX_FALCON_H1_DEQUANTIZE_MATMUL).
As in the benchmark, N layers measure N - 1 whole layers plus the last one's
K/V and mixer at prefill. Records the machine's load average: other work on a
shared machine skews both columns alike only when they alternate.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import mlx_falcon_h1  # first: picks the BLAS before mlx.core loads (blas.py)
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_falcon_h1 import blas
from mlx_falcon_h1.benchmark import make_random_model, run_once, weight_bytes
from mlx_falcon_h1.evaluate import perplexity
from mlx_falcon_h1.loading import load_model

SWITCH = "MLX_FALCON_H1_DEQUANTIZE_MATMUL"
PATHS = {"dequantize+blas": "1", "quantized_matmul": "0"}


def timed_evaluation(model, tokens, seq_len):
    tic = time.perf_counter()
    result = perplexity(lambda ids: model(mx.array(ids)), tokens, seq_len=seq_len, batch_size=1)
    return {"eval_tps": (len(tokens) - 1) / (time.perf_counter() - tic), "perplexity": result["perplexity"]}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="0.5B")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mode", default="affine", choices=("affine", "mxfp4", "nvfp4", "mxfp8"))
    p.add_argument("--bits", type=int, default=4, help="affine only")
    p.add_argument("--prompt-tokens", "-p", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--eval-tokens", type=int, default=513, help="0: no evaluation")
    p.add_argument("--eval-seq-len", type=int, default=256)
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "benchmarks" / "quantized_prefill_cpu.json")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_model(args.shape, Path(tmp), "float32", layers=args.layers)
        model = load_model(folder)[0]
    affine = args.mode == "affine"
    nn.quantize(model, group_size=64 if affine else None, bits=args.bits if affine else None, mode=args.mode)
    vocab = model.args.vocab_size
    step = max(args.prompt_tokens)

    def each_path(measure):
        """measure() under each path, trials alternating: {path: [results]}."""
        runs = {name: [] for name in PATHS}
        for _ in range(args.trials):
            for name, switch in PATHS.items():
                os.environ[SWITCH] = switch
                runs[name].append(measure())
        os.environ.pop(SWITCH)
        return runs

    each_path(lambda: run_once(model, mx.arange(300) % vocab, 0, step))  # warm-up
    rows = []
    for length in args.prompt_tokens:
        prompt = mx.random.randint(0, vocab, (length,), key=mx.random.key(length))
        runs = each_path(lambda: run_once(model, prompt, 0, step))
        row = {"prompt_tokens": length}
        for name, results in runs.items():
            row[f"{name}_prompt_tps"] = max(r["prompt_tps"] for r in results)
            row[f"{name}_prompt_tps_runs"] = [r["prompt_tps"] for r in results]
            row[f"{name}_transient_peak_gb"] = min(r["transient_peak_gb"] for r in results)
        row["speedup"] = row["dequantize+blas_prompt_tps"] / row["quantized_matmul_prompt_tps"]
        rows.append(row)
        print(row, flush=True)
    evaluation = None
    if args.eval_tokens:
        tokens = np.asarray(mx.random.randint(0, vocab, (args.eval_tokens,), key=mx.random.key(0)))
        runs = each_path(lambda: timed_evaluation(model, tokens, args.eval_seq_len))
        evaluation = {"tokens": args.eval_tokens, "seq_len": args.eval_seq_len}
        for name, results in runs.items():
            evaluation[f"{name}_eval_tps"] = max(r["eval_tps"] for r in results)
            evaluation[f"{name}_perplexity"] = results[0]["perplexity"]
        evaluation["speedup"] = evaluation["dequantize+blas_eval_tps"] / evaluation["quantized_matmul_eval_tps"]
        print(evaluation, flush=True)
    result = {
        "shape": args.shape,
        "layers": args.layers,
        "quantization": {"mode": args.mode, "bits": args.bits if affine else None, "group_size": 64 if affine else None},
        "weight_gb": weight_bytes(model) / 1e9,
        "prefill_step_size": step,
        "trials": args.trials,
        "mlx": mx.__version__,
        "device": f"{mx.default_device()} ({platform.machine()}, {platform.system()}, {os.cpu_count()} CPUs)",
        "blas": blas.in_use,
        "loadavg_before_after": [load_before, os.getloadavg()],
        "rows": rows,
        "evaluation": evaluation,
    }
    label = f"affine {args.bits}-bit" if affine else args.mode
    print(f"\n{args.shape}, {args.layers} layers, {label}; BLAS {blas.in_use}")
    print("| prompt | prefill tok/s, MLX quantized matmul | dequantize + BLAS | x | transient peak GB (qmm / ours) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prompt_tokens']} | {r['quantized_matmul_prompt_tps']:.2f} | {r['dequantize+blas_prompt_tps']:.2f} | "
              f"{r['speedup']:.1f} | {r['quantized_matmul_transient_peak_gb']:.3f} / {r['dequantize+blas_transient_peak_gb']:.3f} |")  # fmt: skip
    if evaluation:
        print(f"| evaluation {evaluation['tokens']} tokens (windows of {evaluation['seq_len']}) | "
              f"{evaluation['quantized_matmul_eval_tps']:.2f} | {evaluation['dequantize+blas_eval_tps']:.2f} | "
              f"{evaluation['speedup']:.1f} | |")  # fmt: skip
    before, after = result["loadavg_before_after"]
    print(f"machine load average before {before[0]:.2f}, after {after[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
