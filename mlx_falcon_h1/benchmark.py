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
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_lm.utils import save_config

from . import allocator, blas, decode, folder_format, mac_speed_model
from .launch_count import decode_step_launches, our_decode_step
from .mac_speed_model import TINY_90M, weight_bytes, weight_bytes_read_per_token
from .fused_projections import fuse_projections, fusion_summary
from .loading import load_model
from .released_shapes import RELEASED
from .model import Model, ModelArgs
from .parameter_dtypes import castable

# A tiny shape for smoke runs, Falcon-H1-Tiny-90M's (mac_speed_model.TINY_90M) and the
# released ones (released_shapes.RELEASED); every random model gets Falcon-H1-0.5B's multipliers.
TINY = dict(model_type="falcon_h1", rope_theta=1e11, max_position_embeddings=16384,
            num_hidden_layers=2, hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, mamba_n_heads=8, mamba_d_head=32, mamba_d_ssm=256, mamba_d_state=16,
            intermediate_size=256, vocab_size=512, mamba_chunk_size=32)  # fmt: skip
SHAPES = {"tiny": TINY, "Tiny-90M": TINY_90M, **RELEASED}
MULTIPLIERS_05B = dict(
    embedding_multiplier=5.656854249492381, lm_head_multiplier=0.0390625,
    key_multiplier=0.39062499999999994, attention_in_multiplier=1.0,
    attention_out_multiplier=0.9375, ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.23570226039551587, mlp_multipliers=[0.8838834764831844, 0.5859375],
    ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
)  # fmt: skip


def random_model(config: dict, dtype: str):
    """A random Falcon-H1 of `config` (a shape's fields) as our converter would leave
    it, in memory: the random weights stand for weights with the multipliers
    folded in (the returned config states what is left to apply and records the
    0.5B's), castable weights in `dtype`. Returns (model, config with every field
    spelled out, as the converter writes it)."""
    config = dict(**config, **MULTIPLIERS_05B)
    originals = folder_format.original_multipliers(config)
    config = folder_format.folded_config(config, originals, ssm_dtype="float32")
    args = ModelArgs.from_dict(config)
    model = Model(args)
    for layer in model.layers:  # SSM parameters as transformers initialises them
        heads = layer.mamba.A_log.shape[0]
        layer.mamba.A_log = mx.log(mx.arange(1, heads + 1, dtype=mx.float32))
    target = getattr(mx, dtype)
    model.update(tree_unflatten([(n, w.astype(target)) for n, w in tree_flatten(model.parameters()) if castable(n)]))
    # Every field spelled out, as the converter writes them: mlx-lm's defaults
    # differ from ours (tie_word_embeddings, mamba_norm_before_gate ...).
    for f in fields(ModelArgs):
        if f.name != folder_format.FORMAT_KEY:
            value = getattr(args, f.name)
            config[f.name] = list(value) if isinstance(value, tuple) else value
    config["rope_theta"] = args.rope_base
    return model, config


def make_random_model(shape: str, out: Path, dtype: str, layers: Optional[int] = None,
                      fields_over: Optional[dict] = None, bits: Optional[int] = None) -> Path:
    """A random Falcon-H1 of `shape` (with `layers` layers and `fields_over` config
    fields, if given) in the folder format our converter writes (random_model),
    conv1d in MLX layout; with `bits`, affine-quantized (group size 64) as
    mlx-lm's converter quantizes: every layer whose width the group size divides."""
    config = dict(SHAPES[shape], **(fields_over or {}))
    if layers is not None:
        config["num_hidden_layers"] = layers
    model, config = random_model(config, dtype)
    if bits:
        nn.quantize(model, group_size=QUANT_GROUP, bits=bits)
        config["quantization"] = {"group_size": QUANT_GROUP, "bits": bits, "mode": "affine"}
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())), {"format": "mlx"})
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


def load_ours(folder) -> Model:
    """Our model as load() gives it to generation: the projections fused
    (fused_projections.py), without the tokenizer."""
    model = load_model(folder)[0]
    fuse_projections(model)
    return model


def benchmark(
    model_path: Path,
    prompt_tokens=(512, 2048, 8192),
    generation_tokens: int = 32,
    num_trials: int = 1,
    prefill_step_size: int = 2048,
    stock: bool = True,
    unfused: bool = False,
) -> dict:
    """unfused: also measure ours with the projections as stored ("ours-unfused"),
    alternating with the fused model that load() gives generation."""
    import mlx_lm.utils

    load_before = os.getloadavg()  # other work on the machine skews both columns
    loaders = {"ours": lambda: load_ours(model_path)}
    if unfused:
        loaders["ours-unfused"] = lambda: load_model(model_path)[0]
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
    total = len(prompt_tokens) * num_trials * len(models)
    print(f"Measuring {', '.join(models)}: {total} runs (prompts of {', '.join(map(str, prompt_tokens))} "
          f"tokens, {generation_tokens} decoded each); a line as each ends", file=sys.stderr, flush=True)  # fmt: skip
    for model in models.values():
        run_once(model, mx.arange(min(WARMUP_TOKENS, prefill_step_size)) % vocab, 2, prefill_step_size)
    decoding = generation_tokens > 0  # else prefill only: nothing decode-related is measured
    launches = {
        name: decode_step_launches(model, our_decode_step if name.startswith("ours") else None)
        for name, model in models.items()
    } if decoding else {}  # fmt: skip
    bandwidth, matvec = (memory_bandwidth(), matvec_bandwidth()) if decoding else (None, None)
    rows = []
    for length in prompt_tokens:
        prompt = mx.random.randint(0, vocab, (length,), key=mx.random.key(length))
        runs = {name: [] for name in models}
        for trial in range(num_trials):  # alternate, so drift hits both alike
            for name, model in models.items():
                runs[name].append(run_once(model, prompt, generation_tokens, prefill_step_size))
                got = runs[name][-1]
                decoded = f", decode {got['generation_tps']:.1f} tok/s" if "generation_tps" in got else ""
                print(f"  {name}: {length}-token prompt (trial {trial + 1}/{num_trials}): "
                      f"prefill {got['prompt_tps']:.0f} tok/s{decoded}", file=sys.stderr, flush=True)  # fmt: skip
        row = {"prompt_tokens": length}
        for name, results in runs.items():
            for key in results[0]:
                values = [r[key] for r in results]
                row[f"{name}_{key}"] = min(values) if "peak" in key else max(values)
            row[f"{name}_peak_gb"] = row[f"{name}_transient_peak_gb"] + weight_bytes(models[name]) / 1e9
        rows.append(row)
    per_token = weight_bytes_read_per_token(models["ours"])
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
        "decode_launches_per_token": {name: r["total"] for name, r in launches.items()} or None,
        "decode_launches_by_primitive": {name: r["by_primitive"] for name, r in launches.items()} or None,
        "fused_projections": fusion_summary(models["ours"]),
        "compiled_decode": decode.compiled_decode(models["ours"]) is not None,
        "compiled_decode_traces": getattr(models["ours"].__dict__.get("_compiled_decode"), "traces", 0),
        "rows": rows,
    }


QUANT_GROUP = 64
MAC_KINDS = {"bf16": None, "4-bit": 4}  # weights as a Mac runs them: bfloat16, or affine 4-bit g64
MAC_TABLE_CHIPS = ("M1 Ultra", "M3 Max", "M4 Max", "M5 Max")
COUNT_VOCAB = 1024  # the counting models' vocabulary: the head's launches do not depend on it
# Decode at long context, where the K/V read decides: 4-bit weights, K/V in bf16 or
# --kv-bits (group size 64, mlx-lm's default). mlx-lm's falcon_h1 cache (a CacheList)
# has no to_quantized, so its --kv-bits does nothing: its K/V stays bf16.
LONG_CONTEXT_SHAPES = ("1.5B", "7B")
LONG_CONTEXTS = (32768, 131072)
KV_KINDS = {"bf16": None, "8-bit": 8, "4-bit": 4}
KV_GROUP = 64
FLOAT_TAIL_MEAN = 128  # ours keep a decode's newest <= 256 tokens' K/V in float (cache.py)
# MLX's one-query sdpa is two kernels (key blocks, then a combine) from 1,024 keys on
# Max and Ultra chips and from 4,096 with grouped K/V heads on any chip
# (mlx/backend/metal/scaled_dot_product_attention.cpp, ml-explore/mlx); the counter's
# stand-in counts one. At these contexts every float-K/V step pays the second.
SDPA_SECOND_PASS_KEYS = 4096


def _shape_launches(shape: str, bits: Optional[int], cache_dir: Path, kv_bits: Optional[int] = None) -> dict:
    """Launches of one decode step as on a Mac, ours (its default step) and
    mlx-lm's, for `shape`'s layers: counted on models of 1 and 2 layers loaded
    from folders as users load them (so whatever load-time transform the model
    does counts), then launches per token = fixed + per layer x layers. The
    layers keep the shape's widths; the vocabulary is COUNT_VOCAB (the head is
    one matmul, the lookup one gather, at any size), so a 34B layer fits here.
    kv_bits: ours with its K/V quantized (mlx-lm's cache ignores it: counted as is)."""
    import mlx_lm.utils

    totals = {}
    for layers in (1, 2):
        folder = cache_dir / f"count-{shape}-{layers}layers-{bits or 16}bit"
        if not (folder / "config.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            make_random_model(shape, folder, "bfloat16", layers, dict(vocab_size=COUNT_VOCAB), bits)
        models = {"ours": load_ours(folder), "mlx-lm": mlx_lm.utils.load_model(folder)[0]}
        # mlx-lm as its converter leaves a bf16 checkpoint (every float weight cast, the
        # published mlx-community one included); our folder keeps the SSM parameters and
        # norms in float32, which would add casts to mlx-lm's step that its users never run.
        models["mlx-lm"].set_dtype(mx.bfloat16)
        totals[layers] = {
            "ours": decode_step_launches(models["ours"], our_decode_step, kv_bits=kv_bits,
                                         kv_group_size=KV_GROUP)["total"],
            "mlx-lm": decode_step_launches(models["mlx-lm"])["total"]}
        del models
        mx.clear_cache()
    out = {}
    for name in ("ours", "mlx-lm"):
        per_layer = totals[2][name] - totals[1][name]
        out[name] = {"per_layer": per_layer, "fixed": totals[1][name] - per_layer}
    return out


def _shape_bytes(shape: str, bits: Optional[int], context: int = mac_speed_model.PUBLISHED_CONTEXT,
                 kv_bits: Optional[int] = None) -> dict:
    """Bytes a decode step reads at the full shape, ours and mlx-lm's: weights from
    models built lazily (never evaluated: shapes only), plus the cache's state at
    `context` tokens (ours with kv_bits: quantized K/V but its float tail)."""
    import mlx_lm.models.falcon_h1 as stock

    model, config = random_model(dict(SHAPES[shape]), "bfloat16")
    theirs = stock.Model(stock.ModelArgs.from_dict(config))
    theirs.set_dtype(mx.bfloat16)
    if bits:
        for m in (model, theirs):
            nn.quantize(m, group_size=QUANT_GROUP, bits=bits)
    state = {"ours": mac_speed_model.state_bytes_per_token(config, context, 2, kv_bits, KV_GROUP, FLOAT_TAIL_MEAN),
             "mlx-lm": mac_speed_model.state_bytes_per_token(config, context, 2)}
    return {name: weight_bytes_read_per_token(m) + state[name] for name, m in (("ours", model), ("mlx-lm", theirs))}


def mac_prediction(cache_dir: Path, shapes=None) -> dict:
    """Launches per layer and per token (ours, mlx-lm) at every shape, bf16 and
    4-bit, and the Mac speed model's PREDICTED decode tok/s, calibrated first
    against mlx-lm's published Falcon-H1-Tiny-90M 4-bit figures."""
    speed = mac_speed_model
    shapes = ["Tiny-90M"] + [s for s in shapes or RELEASED if s != "Tiny-90M"]  # the calibration's model first
    rows = []
    for shape in shapes:
        for kind, bits in MAC_KINDS.items():
            launches = _shape_launches(shape, bits, cache_dir)
            layers = SHAPES[shape]["num_hidden_layers"]
            row = {"shape": shape, "weights": kind, "layers": layers,
                   "bytes_per_token": _shape_bytes(shape, bits)}  # fmt: skip
            for name, c in launches.items():
                row[f"{name}_per_layer"] = c["per_layer"]
                row[f"{name}_fixed"] = c["fixed"]
                row[f"{name}_per_token"] = c["fixed"] + c["per_layer"] * layers
            rows.append(row)
    calibration_row = next(r for r in rows if r["shape"] == "Tiny-90M" and r["weights"] == "4-bit")
    fitted, calibration = {}, []
    for point in speed.PUBLISHED:
        chip = speed.CHIPS[point.chip]
        args = (calibration_row["mlx-lm_per_token"], calibration_row["bytes_per_token"]["mlx-lm"], chip)
        fitted[point.chip] = speed.calibrate(point.tokens_per_s, *args)
        calibration.append({
            "chip": point.chip, "published_tps": point.tokens_per_s, "source": point.source,
            "fitted_t_launch_us": fitted[point.chip] * 1e6,
            "within_published_range": speed.T_LAUNCH_RANGE_S[0] <= fitted[point.chip] <= speed.T_LAUNCH_RANGE_S[1],
            "model_tps_at_fit": speed.predicted_tokens_per_s(*args, fitted[point.chip]),
            "command_buffers": speed.command_buffers(args[0], args[1], chip),
        })  # fmt: skip
    long_rows = _long_context_rows(cache_dir, rows) if set(LONG_CONTEXT_SHAPES) <= set(shapes) else []
    for row in rows + long_rows:
        row["predicted_tps"] = {}
        for chip_name, chip in speed.CHIPS.items():
            low, high = speed.t_launch_band(fitted, chip_name)
            row["predicted_tps"][chip_name] = {
                name: sorted(speed.predicted_tokens_per_s(row[f"{name}_per_token"], row["bytes_per_token"][name],
                                                           chip, t) for t in {low, high})  # fmt: skip
                for name in ("ours", "mlx-lm")
            }
    return {
        "what": "PREDICTED Mac decode tok/s (mac_speed_model.py), not measured; launches counted as on a Mac "
                "(launch_count.py) with the code as it is at this commit",  # fmt: skip
        "mlx": mx.__version__, "mlx_lm": __import__("mlx_lm").__version__,
        "t_buffer_us": speed.T_BUFFER_S * 1e6,
        "t_launch_published_range_us": [t * 1e6 for t in speed.T_LAUNCH_RANGE_S],
        "context_tokens": speed.PUBLISHED_CONTEXT, "count_vocab": COUNT_VOCAB,
        "chips": {name: vars(chip) for name, chip in speed.CHIPS.items()},
        "calibration": calibration, "rows": rows,
        "long_context": {"what": "4-bit weights; K/V bf16 or --kv-bits (group size 64); mlx-lm's --kv-bits does "
                                 "nothing for falcon_h1 (its K/V stays bf16); MLX's sdpa counted as its 2 kernels",
                         "rows": long_rows},
    }  # fmt: skip


def _long_context_rows(cache_dir: Path, rows) -> list:
    """Decode at LONG_CONTEXTS for LONG_CONTEXT_SHAPES (4-bit weights), K/V in bf16 or
    --kv-bits: launches per token counted (with the second pass MLX's sdpa takes
    there) and bytes read at that context."""
    out = []
    for shape in LONG_CONTEXT_SHAPES:
        layers = SHAPES[shape]["num_hidden_layers"]
        weights_row = next(r for r in rows if r["shape"] == shape and r["weights"] == "4-bit")
        for kv_kind, kv_bits in KV_KINDS.items():
            counts = _shape_launches(shape, 4, cache_dir, kv_bits) if kv_bits else {
                name: {"per_layer": weights_row[f"{name}_per_layer"], "fixed": weights_row[f"{name}_fixed"]}
                for name in ("ours", "mlx-lm")}
            for context in LONG_CONTEXTS:
                second_pass = {"ours": kv_bits is None, "mlx-lm": True}  # float K/V: MLX's sdpa
                row = {"shape": shape, "weights": "4-bit", "kv": kv_kind, "context": context,
                       "layers": layers, "bytes_per_token": _shape_bytes(shape, 4, context, kv_bits)}
                for name, c in counts.items():
                    per_layer = c["per_layer"] + (second_pass[name] and context >= SDPA_SECOND_PASS_KEYS)
                    row[f"{name}_per_layer"] = per_layer
                    row[f"{name}_per_token"] = c["fixed"] + per_layer * layers
                out.append(row)
    return out


def print_mac_prediction(result: dict, chips=MAC_TABLE_CHIPS) -> None:
    def tps(values):  # one value, or a (low, high) range
        return "-".join(dict.fromkeys(f"{v:.0f}" for v in values))

    print(f"PREDICTED Mac decode tok/s (a model, not a measurement: mac_speed_model.py); mlx {result['mlx']}, "
          f"mlx-lm {result['mlx_lm']}; t_buffer {result['t_buffer_us']:.0f} us; context {result['context_tokens']}")
    print("Calibration (mlx-lm, Falcon-H1-Tiny-90M-Instruct 4-bit, published):")
    for c in result["calibration"]:
        low, high = result["t_launch_published_range_us"]
        print(f"  {c['chip']}: {c['published_tps']} tok/s published -> "
              f"fitted t_launch {c['fitted_t_launch_us']:.2f} us "
              f"({'inside' if c['within_published_range'] else 'OUTSIDE'} the published {low}-{high} us); "
              f"model at the fit {c['model_tps_at_fit']:.1f} tok/s, {c['command_buffers']} command buffers")
    header = ["shape", "weights", "launches/layer ours", "mlx-lm", "x", "launches/token ours", "mlx-lm", "x"]
    header += [f"{chip} {name}" for chip in chips for name in ("ours", "mlx-lm")]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in result["rows"]:
        cells = [r["shape"], r["weights"], str(r["ours_per_layer"]), str(r["mlx-lm_per_layer"]),
                 f"{r['ours_per_layer'] / r['mlx-lm_per_layer']:.2f}", str(r["ours_per_token"]),
                 str(r["mlx-lm_per_token"]), f"{r['ours_per_token'] / r['mlx-lm_per_token']:.2f}"]  # fmt: skip
        cells += [tps(r["predicted_tps"][chip][name]) for chip in chips for name in ("ours", "mlx-lm")]
        print("| " + " | ".join(cells) + " |")
    fitted = ", ".join(c["chip"] for c in result["calibration"])
    print(f"(tok/s on {fitted}: at that chip's fitted t_launch; on the others, a-b: at the fitted values' range)")
    if result["long_context"]["rows"]:
        print(f"Long context: {result['long_context']['what']}")
        header = ["shape", "K/V", "context", "launches/layer ours", "mlx-lm", "GB read/token ours", "mlx-lm"]
        header += [f"{chip} {name}" for chip in chips for name in ("ours", "mlx-lm")]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in result["long_context"]["rows"]:
            cells = [r["shape"], r["kv"], f"{r['context'] // 1024}K", str(r["ours_per_layer"]),
                     str(r["mlx-lm_per_layer"])] + [f"{r['bytes_per_token'][n] / 1e9:.2f}" for n in ("ours", "mlx-lm")]
            cells += [tps(r["predicted_tps"][chip][name]) for chip in chips for name in ("ours", "mlx-lm")]
            print("| " + " | ".join(cells) + " |")


# What each measure is called in the table: header, and in the ratio columns.
MEASURES = {"prompt_tps": ("prefill tok/s", "prefill"), "generation_tps": ("decode tok/s", "decode"),
            "peak_gb": ("peak GB", "peak")}  # fmt: skip


def print_table(result: dict) -> None:
    print(f"model {result['model']} ({result['layers']} layers)  dtype {result['dtype']}  "
          f"mlx {result['mlx']}  device {result['device']}")  # fmt: skip
    print(f"BLAS: {result['blas']}; malloc: {result['malloc']}; prefill step {result['prefill_step_size']}")
    stock = any(k.startswith("mlx-lm") for k in result["rows"][0])
    names = [n for n in ("ours", "ours-unfused") if f"{n}_prompt_tps" in result["rows"][0]]
    names += ["mlx-lm"] if stock else []
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
    per_token = ", ".join(f"{k} {v}" for k, v in result["decode_launches_per_token"].items())
    line += f"; per token {per_token}"
    print(f"decode launches per layer as on a Mac: {line}; compiled decode step "
          f"{'on' if result['compiled_decode'] else 'off'}, traced {result['compiled_decode_traces']} times")  # fmt: skip
    print(f"decode bound: {result['weight_bytes_per_token'] / 1e9:.2f} GB of weights read per token at "
          f"{result['bandwidth_gbps']:.1f} GB/s (memory read) = {result['decode_bound_tps']:.2f} tok/s; "
          f"ours at the shortest prompt: {result['rows'][0]['ours_generation_tps'] / result['decode_bound_tps']:.0%} of it "
          f"(MLX's f32 mat-vec streams {result['mlx_matvec_gbps']:.1f} GB/s)")  # fmt: skip


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--chat-reuse" in argv:  # its own command: the servers' prompt caches on chat requests
        from . import chat_reuse

        return chat_reuse.main([a for a in argv if a != "--chat-reuse"], make_random_model, RELEASED)
    p = argparse.ArgumentParser(description="Falcon-H1 benchmark: ours vs mlx-lm, same weights "
                                            "(--chat-reuse: the servers' prompt caches; --chat-reuse --help).")
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
    p.add_argument("--unfused-too", action="store_true",
                   help="Also measure ours with the projections unfused, as stored (alternating).")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "mlx_falcon_h1"),
                   help="Where built random models are kept.")  # fmt: skip
    p.add_argument("--json", default="benchmark.json", help="Where to write the results.")
    p.add_argument("--mac-prediction", nargs="*", metavar="SHAPE", choices=list(SHAPES),
                   help="Count decode launches (ours, mlx-lm) at these shapes (default: Falcon-H1-Tiny-90M and "
                        "every released one), bf16 and 4-bit, and print the Mac speed model's PREDICTED tok/s, "
                        "calibrated on Tiny-90M (always counted); no timing run.")
    args = p.parse_args(argv)
    if args.mac_prediction is not None:
        result = mac_prediction(Path(args.cache_dir), args.mac_prediction or None)
        print_mac_prediction(result)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
        return
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
        args.prefill_step_size, stock=not args.no_stock, unfused=args.unfused_too,
    )  # fmt: skip
    result["shape"] = None if args.model else args.shape
    result["command"] = "python -m mlx_falcon_h1.benchmark " + " ".join(argv or __import__("sys").argv[1:])
    print_table(result)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    from .cli import run

    run(main)
