"""`python -m mlx_falcon_h1.benchmark`: our Falcon-H1 against mlx-lm's, same weights, same run.

Mirrors `mlx_lm.benchmark`: prompt (prefill) tokens/s, generation (decode)
tokens/s and peak memory, here for each prompt length and for both
implementations loading the same converted folder, runs alternating. Without
--model it builds a random model of a released shape (--shape) in our
converter's folder format, so nothing is downloaded. Prints a table with the ratio ours/mlx-lm
and writes JSON; states dtype, MLX version, device and the BLAS in use.

--long measures long prompts: prefill only (-g 0) at 16K, 32K and 64K tokens.
Attention makes that quadratic in time, so on a slow machine --layers N keeps
the released layer shape with fewer of them (recorded in the JSON). Use N >= 2:
a prefill step evaluates only the cache, so the last layer's attention and MLP
run for the prompt's last token only (in both implementations), and N layers
measure N - 1 whole layers plus the last one's K/V and mixer.
"""

import argparse
import json
import os
import platform
import shutil
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_lm.utils import save_config

from . import allocator, blas, decode, folder_format
from .launch_count import decode_step_launches, our_decode_step
from .loading import load_model
from .released_shapes import RELEASED
from .model import Model, ModelArgs, castable

# A tiny shape for smoke runs, and the released ones (released_shapes.RELEASED); every
# random model gets Falcon-H1-0.5B's multipliers.
TINY = dict(model_type="falcon_h1", rope_theta=1e11, max_position_embeddings=16384,
            num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, mamba_n_heads=8, mamba_d_head=32, mamba_d_ssm=256, mamba_d_state=16,
            intermediate_size=256, vocab_size=512, mamba_chunk_size=32)  # fmt: skip
SHAPES = {"tiny": TINY, **RELEASED}
MULTIPLIERS_05B = dict(
    embedding_multiplier=5.656854249492381, lm_head_multiplier=0.0390625,
    key_multiplier=0.39062499999999994, attention_in_multiplier=1.0,
    attention_out_multiplier=0.9375, ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.23570226039551587, mlp_multipliers=[0.8838834764831844, 0.5859375],
    ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
)  # fmt: skip


def make_random_model(shape: str, out: Path, dtype: str, layers: Optional[int] = None) -> Path:
    """A random Falcon-H1 of `shape` (with `layers` layers, if given) in the folder
    format our converter writes: the random weights stand for weights with the
    multipliers folded in (config.json states what is left to apply and records
    the 0.5B's), conv1d in MLX layout, castable weights in `dtype`."""
    config = dict(**SHAPES[shape], **MULTIPLIERS_05B)
    if layers is not None:
        config["num_hidden_layers"] = layers
    originals = folder_format.original_multipliers(config)
    config = folder_format.folded_config(config, originals, ssm_dtype="float32")
    args = ModelArgs.from_dict(config)
    model = Model(args)
    for layer in model.layers:  # SSM parameters as transformers initialises them
        heads = layer.mamba.A_log.shape[0]
        layer.mamba.A_log = mx.log(mx.arange(1, heads + 1, dtype=mx.float32))
    target = getattr(mx, dtype)
    weights = {n: w.astype(target) if castable(n) else w for n, w in tree_flatten(model.parameters())}
    # Every field spelled out, as the converter writes them: mlx-lm's defaults
    # differ from ours (tie_word_embeddings, mamba_norm_before_gate ...).
    for f in fields(ModelArgs):
        if f.name != folder_format.FORMAT_KEY:
            value = getattr(args, f.name)
            config[f.name] = list(value) if isinstance(value, tuple) else value
    config["rope_theta"] = args.rope_base
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), weights, {"format": "mlx"})
    # Last: main() rebuilds a folder without it. mlx-lm's writer encodes inf as its reader expects.
    save_config(config, out / "config.json")
    return out


def memory_bandwidth() -> float:
    """Bytes/s the machine streams from memory: a 1 GiB float32 read (numpy's sum),
    by one thread and by two threads over halves; the faster.

    This is what bounds decode (every weight is read once per token). It is
    measured outside MLX on purpose: MLX's own mat-vec (matvec_bandwidth) is
    slower than the memory on some CPUs, and a bound built from it would
    measure MLX, not the machine.
    """
    import threading

    import numpy as np

    a = np.ones(1 << 28, dtype=np.float32)
    halves = np.split(a, 2)

    def two_threads():
        threads = [threading.Thread(target=h.sum) for h in halves]  # sum releases the GIL
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    runs = []
    for read in (a.sum, two_threads) * 4:
        tic = time.perf_counter()
        read()
        runs.append(time.perf_counter() - tic)
    return a.nbytes / min(runs[2:])


def matvec_bandwidth() -> float:
    """Bytes/s of MLX's float32 matrix-vector product over 1 GiB (for comparison)."""
    w = mx.random.normal((16384, 16384))
    x = mx.random.normal((16384,))
    mx.eval(w, x, w @ x)
    runs = []
    for _ in range(3):
        tic = time.perf_counter()
        mx.eval(w @ x)
        runs.append(time.perf_counter() - tic)
    del w
    return 2**30 / min(runs)


WARMUP_TOKENS = 300
LONG_PROMPT_TOKENS = (16384, 32768, 65536)


def run_once(model, prompt: mx.array, generation_tokens: int, prefill_step_size: int) -> dict:
    from mlx_lm.generate import generate_step

    mx.clear_cache()
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    first = None
    for n, _ in enumerate(
        generate_step(prompt, model, max_tokens=generation_tokens, prefill_step_size=prefill_step_size)
    ):
        if n == 0:
            first = time.perf_counter()
    end = time.perf_counter()
    result = {"transient_peak_gb": (mx.get_peak_memory() - base) / 1e9}
    if generation_tokens == 0:  # prefill only: it ends with the last prompt token's logits
        return {"prompt_tps": prompt.size / (end - tic), **result}
    return {
        "prompt_tps": prompt.size / (first - tic),
        "generation_tps": (generation_tokens - 1) / (end - first),
        **result,
    }


def weight_bytes(model) -> int:
    return sum(w.nbytes for _, w in tree_flatten(model.parameters()))


def bytes_read_per_token(model) -> int:
    """Weight bytes a decode step reads: all but the embedding table, of which
    it reads one row (unless the table is also the tied output head)."""
    table = weight_bytes(model.model.embed_tokens)  # with its scales if quantized
    return weight_bytes(model) - (0 if model.args.tie_word_embeddings else table)


def benchmark(
    model_path: Path,
    prompt_tokens=(512, 2048, 8192),
    generation_tokens: int = 32,
    num_trials: int = 1,
    prefill_step_size: int = 2048,
    stock: bool = True,
) -> dict:
    import mlx_lm.utils

    load_before = os.getloadavg()  # other work on the machine skews both columns
    loaders = {"ours": lambda: load_model(model_path)[0]}
    if stock:
        loaders["mlx-lm"] = lambda: mlx_lm.utils.load_model(Path(model_path))[0]
    for file in Path(model_path).glob("*.safetensors"):  # page cache warm for both loaders
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    models, load_s = {}, {}
    for name, loader in loaders.items():
        tic = time.perf_counter()
        models[name] = loader()
        load_s[name] = time.perf_counter() - tic
    vocab = models["ours"].args.vocab_size
    # Warm-up: first calls pay one-time setup, including the native code MLX
    # compiles for each mx.compile'd graph (both implementations have some). A
    # prompt of WARMUP_TOKENS takes every path a long prompt takes (several SSM
    # chunks, blocked attention, the cache's rollback split), so the timed runs
    # measure steady state, not the compiler.
    for model in models.values():
        run_once(model, mx.arange(min(WARMUP_TOKENS, prefill_step_size)) % vocab, 2, prefill_step_size)
    decoding = generation_tokens > 0  # else prefill only: nothing decode-related is measured
    launches = {
        name: decode_step_launches(model, our_decode_step if name == "ours" else None)
        for name, model in models.items()
    } if decoding else {}  # fmt: skip
    bandwidth, matvec = (memory_bandwidth(), matvec_bandwidth()) if decoding else (None, None)
    rows = []
    for length in prompt_tokens:
        prompt = mx.random.randint(0, vocab, (length,), key=mx.random.key(length))
        runs = {name: [] for name in models}
        for _ in range(num_trials):  # alternate, so drift hits both alike
            for name, model in models.items():
                runs[name].append(run_once(model, prompt, generation_tokens, prefill_step_size))
        row = {"prompt_tokens": length}
        for name, results in runs.items():
            for key in results[0]:
                values = [r[key] for r in results]
                row[f"{name}_{key}"] = min(values) if "peak" in key else max(values)
            row[f"{name}_peak_gb"] = row[f"{name}_transient_peak_gb"] + weight_bytes(models[name]) / 1e9
        rows.append(row)
    per_token = bytes_read_per_token(models["ours"])
    return {
        "model": str(model_path),
        "layers": len(models["ours"].layers),
        "prefill_step_size": prefill_step_size,
        "generation_tokens": generation_tokens,
        "dtype": str(models["ours"].model.embed_tokens.weight.dtype).removeprefix("mlx.core."),
        "mlx": mx.__version__,
        "device": f"{mx.default_device()} ({platform.machine()}, {platform.system()})",
        "blas": blas.in_use,
        "malloc": allocator.in_use,
        "load_s": load_s,
        "weight_bytes_per_token": per_token,
        "bandwidth_gbps": bandwidth and bandwidth / 1e9,
        "mlx_matvec_gbps": matvec and matvec / 1e9,
        "decode_bound_tps": bandwidth and bandwidth / per_token,
        "loadavg_before_after": [load_before, os.getloadavg()],
        # Launching primitives of one decode step per layer, as on a Mac (launch_count.py).
        "decode_launches_per_layer": {name: r["per_layer"] for name, r in launches.items()} or None,
        "decode_launches_by_primitive": {name: r["by_primitive"] for name, r in launches.items()} or None,
        "compiled_decode": decode.compiled_decode(models["ours"]) is not None,
        "compiled_decode_traces": getattr(models["ours"].__dict__.get("_compiled_decode"), "traces", 0),
        "rows": rows,
    }


# What each measure is called in the table: header, and in the ratio columns.
MEASURES = {"prompt_tps": ("prefill tok/s", "prefill"), "generation_tps": ("decode tok/s", "decode"),
            "peak_gb": ("peak GB", "peak")}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"model {result['model']} ({result['layers']} layers)  dtype {result['dtype']}  "
          f"mlx {result['mlx']}  device {result['device']}")  # fmt: skip
    print(f"BLAS: {result['blas']}; malloc: {result['malloc']}; prefill step {result['prefill_step_size']}")
    stock = any(k.startswith("mlx-lm") for k in result["rows"][0])
    names = ["ours"] + (["mlx-lm"] if stock else [])
    decode = result["generation_tokens"] > 0
    measures = [m for m in MEASURES if decode or m != "generation_tps"]
    header = "| prompt | " + " | ".join(f"{MEASURES[m][0]} {n}" for m in measures for n in names)
    if stock:
        header += " | " + " | ".join(f"{MEASURES[m][1]} x" for m in measures)
    print(header + " |")
    print("|" + "---|" * (header.count("|")))
    for r in result["rows"]:
        cells = [str(r["prompt_tokens"])]
        for key in measures:
            cells += [f"{r[f'{n}_{key}']:.2f}" for n in names]
        if stock:
            cells += [f"{r[f'ours_{k}'] / r[f'mlx-lm_{k}']:.2f}" for k in measures]
        print("| " + " | ".join(cells) + " |")
    if stock:
        print("(x: ours / mlx-lm)")
    if decode:
        print_decode_details(result, stock)
    load = ", ".join(f"{k} {v:.2f} s" for k, v in result["load_s"].items())
    before, after = result["loadavg_before_after"]
    print(f"load: {load}; machine load average before {before[0]:.2f}, after {after[0]:.2f}")


def print_decode_details(result: dict, stock: bool) -> None:
    launches = result["decode_launches_per_layer"]
    line = ", ".join(f"{k} {v:.1f}" for k, v in launches.items())
    if stock:
        line += f" (x {launches['ours'] / launches['mlx-lm']:.2f})"
    print(f"decode launches per layer as on a Mac: {line}; compiled decode step "
          f"{'on' if result['compiled_decode'] else 'off'}, traced {result['compiled_decode_traces']} times")  # fmt: skip
    print(f"decode bound: {result['weight_bytes_per_token'] / 1e9:.2f} GB of weights read per token at "
          f"{result['bandwidth_gbps']:.1f} GB/s (memory read) = {result['decode_bound_tps']:.2f} tok/s; "
          f"ours at the shortest prompt: {result['rows'][0]['ours_generation_tps'] / result['decode_bound_tps']:.0%} of it "
          f"(MLX's f32 mat-vec streams {result['mlx_matvec_gbps']:.1f} GB/s)")  # fmt: skip


def main(argv=None):
    p = argparse.ArgumentParser(description="Falcon-H1 benchmark: ours vs mlx-lm, same weights.")
    p.add_argument("--model", default=None, help="A converted folder (default: build a random one).")
    p.add_argument("--shape", default="0.5B", choices=list(SHAPES), help="Shape of the random model.")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--prompt-tokens", "-p", type=int, nargs="+",
                   help="Prompt lengths (default 512 2048 8192; with --long 16384 32768 65536).")
    p.add_argument("--generation-tokens", "-g", type=int,
                   help="Tokens decoded per run (default 32; with --long 0: prefill only).")
    p.add_argument("--long", action="store_true",
                   help="Long prompts: prefill tokens/s and peak memory at 16K, 32K and 64K tokens.")
    p.add_argument("--layers", type=int, default=None,
                   help="Random model: this many layers of --shape's layer shape (default: the shape's).")
    p.add_argument("--num-trials", "-n", type=int, default=1)
    p.add_argument("--prefill-step-size", type=int, default=2048)
    p.add_argument("--no-stock", action="store_true", help="Measure ours only.")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mlx_falcon_h1"),
                   help="Where built random models are kept.")  # fmt: skip
    p.add_argument("--json", default="benchmark.json", help="Where to write the results.")
    args = p.parse_args(argv)
    if args.layers is not None and args.model is not None:
        p.error("--layers shapes a random model; it does not apply to --model")
    prompt_tokens = args.prompt_tokens or (list(LONG_PROMPT_TOKENS) if args.long else [512, 2048, 8192])
    generation_tokens = args.generation_tokens
    if generation_tokens is None:
        generation_tokens = 0 if args.long else 32

    model_path = args.model
    if model_path is None:
        layers = "" if args.layers is None else f"-{args.layers}layers"
        model_path = Path(args.cache_dir) / f"random-{args.shape}{layers}-{args.dtype}"
        if not (model_path / "config.json").exists():
            print(f"Building a random {args.shape} model in {model_path} ...")
            model_path.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(model_path, ignore_errors=True)
            make_random_model(args.shape, model_path, args.dtype, args.layers)
    result = benchmark(
        Path(model_path), prompt_tokens, generation_tokens, args.num_trials,
        args.prefill_step_size, stock=not args.no_stock,
    )  # fmt: skip
    result["shape"] = None if args.model else args.shape
    result["command"] = "python -m mlx_falcon_h1.benchmark " + " ".join(argv or __import__("sys").argv[1:])
    print_table(result)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    from .cli import run

    run(main)
