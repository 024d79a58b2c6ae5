"""`python -m mlx_falcon_h1.memory`: what a Falcon-H1 needs in memory at a given context.

Only the attention K/V grows with the context; the Mamba conv and SSM state are
fixed. This prints, for a converted folder (config.json and the safetensors
headers: nothing is loaded) or a released shape (RELEASED below), the weights,
the K/V, the conv and SSM state, the rollback window and the transient peak of
one prefill step, in total and per layer, and for each Mac memory size whether
that fits under macOS's default GPU working set, and the longest context that
does.

    python -m mlx_falcon_h1.memory --model 7B --context 262144
    python -m mlx_falcon_h1.memory --model path/to/converted --context 32768 --kv-bits 8
    python -m mlx_falcon_h1.memory --markdown          # README tables, every released shape

The prefill peak is derived from the code (model.py, cache.py, kernels/) and
calibrated against MLX's peak memory on the project's CPU machine: see
prefill_transient() for the terms, prefill_peak.py for the measurement, and
examples/memory_planner_check.py for the check at 2K-16K tokens.

Legend: B batch, S prefill step (tokens per call), T tokens in the context,
D hidden size, F MLP size, Hq/Hkv attention/K-V heads, d head dim, H SSM heads,
P SSM head dim, G groups, N state size, K conv width, Q SSD chunk.
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from mlx.utils import tree_flatten

from .cache import MAX_ROLLBACK_TOKENS
from .loading import make_args, read_config, safetensors_header, weight_files
from .model import Model, ModelArgs
from .parameter_dtypes import castable
from .released_shapes import ASSUMED, RELEASED  # noqa: F401  (memory.RELEASED: the shapes it plans)

GiB = 1 << 30

# Fields the sizes depend on: a folder's config.json must state them (the
# defaults transformers would fill in are another model's).
REQUIRED_FIELDS = (
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
    "intermediate_size", "vocab_size", "mamba_n_heads", "mamba_d_state",
)  # fmt: skip

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# --- macOS's default GPU working set ---------------------------------------------
# Metal's MTLDevice.recommendedMaxWorkingSetSize, the memory the GPU may wire
# (MLX and llama.cpp size against it; `sudo sysctl iogpu.wired_limit_mb=N` raises
# it). Reported values on macOS 13-15: 8 GiB -> 5461 MiB, 16 GiB -> 10923 MiB,
# 32 GiB -> 21845 MiB (2/3 of RAM; llama.cpp #5207, llama-cpp-python #687,
# llama.cpp #2011, exo #1672 on macOS 15.6), 64 GiB -> 48 GiB (3/4). Apple
# documents no formula; the rule below (2/3 up to 36 GB, 3/4 above) fits those
# reports. macOS 26 reports more on some machines (128 GiB -> 107.52 GiB,
# antirez/ds4 #893), so on it this table errs on the safe side.
MAC_SIZES_GB = (8, 16, 18, 24, 32, 36, 48, 64, 96, 128, 192)


def gpu_working_set(ram_gb: int) -> int:
    """Bytes the GPU may use by default on a Mac with `ram_gb` GB (GiB) of memory."""
    fraction = 2 / 3 if ram_gb <= 36 else 3 / 4
    return int(ram_gb * GiB * fraction)


# --- reading a model -----------------------------------------------------------


@dataclass
class ModelSizes:
    """What the planner needs to know about one model."""

    name: str
    args: ModelArgs
    weights: int  # bytes
    weights_per_layer: List[int]  # bytes of each decoder layer (embeddings and head excluded)
    weights_dtype: str  # "bfloat16", "4-bit (g64)", ...
    activation_bytes: int  # bytes per activation value (the model's float dtype)
    note: str = ""


def _config_args(config: dict, config_file: Path) -> ModelArgs:
    missing = [f for f in REQUIRED_FIELDS if f not in config]
    if missing:
        raise ValueError(f"{config_file}: no {', '.join(repr(f) for f in missing)} (needed to size the model)")
    return make_args(config, config_file)


def parameter_shapes(args: ModelArgs) -> Dict[str, tuple]:
    """Every parameter's shape, from our own Model (lazy: nothing is allocated)."""
    return {name: p.shape for name, p in tree_flatten(Model(args).parameters())}


def _layer_index(name: str) -> Optional[int]:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        return int(parts[2])
    return None


def shape_sizes(name: str, bits: Optional[int] = None, group_size: int = 64,
                dtype: str = "bfloat16") -> ModelSizes:
    """A released shape's weights at `dtype`, or quantized to `bits` (affine, scales
    and biases in `dtype`) as our converter does: every Linear and the embedding
    whose input size is a multiple of group_size."""
    if name not in RELEASED:
        raise ValueError(f"unknown shape {name!r}; released shapes: {', '.join(RELEASED)}")
    args = ModelArgs.from_dict(RELEASED[name])
    width = DTYPE_BYTES[dtype]
    total, per_layer = 0, [0] * args.num_hidden_layers
    for pname, shape in parameter_shapes(args).items():
        numel = math.prod(shape)
        if not castable(pname):  # float32, never quantized
            size = 4 * numel
        elif bits and pname.endswith(".weight") and len(shape) == 2 and shape[-1] % group_size == 0:
            size = numel * bits // 8 + 2 * (numel // group_size) * width  # packed + scales + biases
        else:
            size = width * numel
        total += size
        layer = _layer_index(pname)
        if layer is not None:
            per_layer[layer] += size
    label = f"{bits}-bit (g{group_size}, {dtype} scales)" if bits else dtype
    return ModelSizes(name, args, total, per_layer, label, width, ASSUMED.get(name, ""))


def folder_sizes(folder: str) -> ModelSizes:
    """A converted or Hugging Face folder: config.json, and the weights' real byte
    sizes from the safetensors headers (the data is never read)."""
    path = Path(folder)
    config = read_config(path)
    args = _config_args(config, path / "config.json")
    total, per_layer = 0, [0] * args.num_hidden_layers
    dtypes: Dict[str, int] = {}
    embed_dtype = None
    for file in weight_files(path):
        for name, info in safetensors_header(file).items():
            start, end = info["data_offsets"]
            total += end - start
            dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + end - start
            layer = _layer_index(name)
            if layer is not None and layer < len(per_layer):
                per_layer[layer] += end - start
            # Activations take the embedding's float dtype (its scales', if quantized).
            if name in ("model.embed_tokens.weight", "model.embed_tokens.scales"):
                if info["dtype"] in ("F32", "F16", "BF16"):
                    embed_dtype = info["dtype"]
    quant = config.get("quantization")
    float_dtype = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(embed_dtype, "bfloat16")
    if quant:
        label = f"{quant.get('bits')}-bit (g{quant.get('group_size')}, {quant.get('mode', 'affine')})"
    else:
        label = float_dtype
    mix = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(dtypes.items(), key=lambda kv: -kv[1]))
    return ModelSizes(str(path), args, total, per_layer, label, DTYPE_BYTES[float_dtype],
                      f"safetensors dtypes: {mix}")


def model_sizes(model: str, bits: Optional[int] = None, group_size: int = 64) -> ModelSizes:
    if model in RELEASED:
        return shape_sizes(model, bits, group_size)
    if bits:
        raise ValueError("--bits applies to a released shape; a folder's weights are read as they are")
    if not Path(model).exists():
        raise ValueError(f"{model}: no such folder, and not a released shape ({', '.join(RELEASED)})")
    return folder_sizes(model)


# --- the plan ------------------------------------------------------------------


def kv_capacity(tokens: int, prefill_step: int, step: int = 256) -> int:
    """Positions a plain mlx-lm KVCache has allocated after a prompt of `tokens`
    prefilled as mlx-lm's generate_step does (steps of `prefill_step`, the last
    token alone): buffers grow in whole multiples of KVCache.step (256)."""
    capacity = offset = 0
    chunks = []
    left = tokens
    while left > 1:
        chunks.append(min(prefill_step, left - 1))
        left -= chunks[-1]
    chunks += [left] if left else []
    for n in chunks:
        if offset + n > capacity:
            if offset % step:
                capacity = offset  # KVCache trims an unaligned buffer before growing it
            capacity += (step + n - 1) // step * step
        offset += n
    return capacity


@dataclass
class Plan:
    """Bytes of each part at `context` tokens (per layer: the same for every layer)."""

    model: str
    weights_dtype: str
    context: int
    batch: int
    prefill_step: int
    kv_bits: Optional[int]
    kv_group_size: int
    max_kv_size: Optional[int]
    layers: int
    kv_positions: int  # positions the K/V buffers hold at the prefill peak
    weights: int
    kv_per_layer: int
    conv_per_layer: int
    ssm_per_layer: int
    rollback_per_layer: int
    prefill_transient: int
    note: str = ""

    @property
    def kv(self) -> int:
        return self.layers * self.kv_per_layer

    @property
    def state(self) -> int:
        return self.layers * (self.conv_per_layer + self.ssm_per_layer)

    @property
    def rollback(self) -> int:
        return self.layers * self.rollback_per_layer

    @property
    def cache(self) -> int:
        return self.kv + self.state + self.rollback

    @property
    def total(self) -> int:
        """The peak: weights, the whole cache, and the last prefill step's transients."""
        return self.weights + self.cache + self.prefill_transient


def kv_bytes_per_position(args: ModelArgs, act: int, kv_bits: Optional[int], group_size: int) -> int:
    """K and V of one position in one layer: 2 * Hkv * d values, or with --kv-bits
    mlx-lm's QuantizedKVCache layout (packed uint32 + one scale and one bias in the
    K/V dtype per group of `group_size` values)."""
    values = 2 * args.num_key_value_heads * args.head_dim
    if kv_bits is None:
        return values * act
    return values * kv_bits // 8 + 2 * (values // group_size) * act


# Calibration of the prefill transient (measured with measure_prefill_peak on this
# project's CPU machine: the 0.5B shape in float32 with 2-36 layers and 256-2048
# token steps; see examples/memory_planner_check.py), with mlx 0.32.4 and
# mlx-lm 0.32.2 on an AMD EPYC (2026-12): they describe those releases' allocator
# and attention. tests/test_memory.py holds the planner to the measured peak, so
# a release that allocates differently fails it: recalibrate then, since the
# planner would mislead users. Each is a count of values kept per token (or per
# context position) of the named size; the derivation is in prefill_transient().
KEPT_LAYERS = 2.5  # layers whose mixer inputs are alive at once (36-layer 0.5B, 2048-token step)
PER_D = 6.5  # hidden-size activations of the working layers (norms, residuals, projections)
PER_F = 6.7  # MLP activations (gate, up, gated product; two layers' at once)
PER_HQ = 3.1  # SSD chunk intermediates: the (Q x Q) decay and score blocks per head, float32
PER_CONTEXT = 2.0  # context copies per K/V value of one layer (V with ones, the buffer growth)
CPU_SCORES = 0.2  # (Hq, S, T) float32 score matrices alive at once on the CPU: timing-dependent (2 layers: ~0.5, the 36-layer check: ~0)
QUANTIZED_SCORES = 1.2  # (Hq, S, T) score matrices alive at once in mlx-lm's quantized attention


def prefill_transient(args: ModelArgs, act: int, step: int, kv_positions: int, batch: int,
                      kv_bits: Optional[int] = None, kv_group_size: int = 64,
                      device: str = "gpu") -> int:
    """Bytes allocated during one prefill step of `step` tokens, on top of the
    weights and the cache, when the K/V holds `kv_positions` positions.

    Derived from the code, coefficients calibrated (above):
    1. A few layers' mixer inputs: in_proj's output (z | xBC | dt, 2 d_ssm + 2GN
       + H values) and the padded conv input (d_ssm + 2GN), alive until the
       layer's new cache arrays are computed from them. Each layer's output
       depends on its cache arrays (cache.py's _with_state), so that happens
       inside the layer; before that (the states were left for the end of the
       step) every layer's were alive at once: 1373 MB above the weights for
       a 2048-token step of the 0.5B shape, 445 MB after. KEPT_LAYERS layers'
       worth fits the 36-layer check.
    2. One layer's working set: activations of size D and F, and the SSD scan's
       chunk intermediates (H x Q float32 per token, a few of them).
    3. Attention against the context, per layer: the blocked attention's copy of
       V with a column of ones and of the visible keys, the buffer growth
       (old and new K/V buffer of one layer), and on the CPU (device="cpu",
       this machine) its float32 scores, about a whole (Hq, S, T) matrix; on a
       Mac's GPU (device="gpu", the default) mx.fast.scaled_dot_product_attention
       keeps none.
    4. With --kv-bits, mlx-lm's quantized attention materialises the whole
       (Hq, S, T) score matrix in the activation dtype (scores, masked scores,
       softmax: each frees the one before; measured ~1.2 of them at once): the
       step size times the context, often the largest part at long contexts
       (then a smaller --prefill-step-size is the remedy).
    The logits of a prefill step are never computed (only the cache is evaluated);
    the last token's logits are one row of the vocabulary.
    """
    d_ssm, gn, heads = args.mamba_d_ssm, args.mamba_n_groups * args.mamba_d_state, args.mamba_n_heads
    in_proj = 2 * d_ssm + 2 * gn + heads
    conv_dim = d_ssm + 2 * gn
    per_layer_kept = act * (in_proj + conv_dim)
    working = (act * (PER_D * args.hidden_size + PER_F * args.intermediate_size)
               + 4 * PER_HQ * heads * min(args.mamba_chunk_size, step))
    context = PER_CONTEXT * kv_bytes_per_position(args, act, kv_bits, kv_group_size) * kv_positions
    scores = 0  # a Mac's GPU: mx.fast.scaled_dot_product_attention keeps no scores
    if device == "cpu":
        # kernels/attention.py scores blocks of query rows, but MLX allocates each
        # block's scores as it schedules the op, ahead of the thread that frees
        # the previous block's: about the whole (Hq, S, T) matrix is alive at once
        # (measured, tests/test_long_context.py).
        scores = int(CPU_SCORES * args.num_attention_heads * step * kv_positions * 4)
    if kv_bits is not None:
        scores = int(QUANTIZED_SCORES * args.num_attention_heads * step * kv_positions * act)
        scores += step * kv_positions  # the boolean causal mask
    kept_layers = min(args.num_hidden_layers, KEPT_LAYERS)
    per_step = step * (kept_layers * per_layer_kept + working) + context + scores
    return int(batch * per_step)


def plan(sizes: ModelSizes, context: int, batch: int = 1, prefill_step: int = 2048,
         kv_bits: Optional[int] = None, kv_group_size: int = 64,
         max_kv_size: Optional[int] = None, max_rollback: int = MAX_ROLLBACK_TOKENS,
         device: str = "gpu") -> Plan:
    """The memory of `sizes` holding `context` tokens. device: "gpu" for a Mac
    (Metal), "cpu" for MLX's CPU backend, which holds attention scores."""
    if device not in ("gpu", "cpu"):
        raise ValueError(f"device must be 'gpu' (a Mac) or 'cpu', not {device!r}")
    args, act = sizes.args, sizes.activation_bytes
    if kv_bits is not None and max_kv_size is not None:
        raise ValueError("--kv-bits with --max-kv-size: mlx-lm cannot quantize a rotating K/V "
                         "cache (RotatingKVCache), so the two are refused together; drop one")
    if context < 1 or batch < 1 or prefill_step < 1:
        raise ValueError(f"context, batch and prefill step must be >= 1 "
                         f"(got {context}, {batch}, {prefill_step})")
    if max_kv_size is not None and max_kv_size < 1:
        raise ValueError(f"--max-kv-size must be >= 1 (got {max_kv_size})")
    step = min(prefill_step, max(context - 1, 1))
    if max_kv_size is None:
        positions = kv_capacity(context, prefill_step)
    elif context <= max_kv_size:
        positions = min(kv_capacity(context, prefill_step), max_kv_size)
    else:
        # RotatingKVCache._update_concat keeps max_size - 1 old positions plus the
        # new step while a prompt is prefilled; decoding then holds max_size.
        positions = max(max_kv_size - 1 + step, max_kv_size)
    kv_per_layer = batch * positions * kv_bytes_per_position(args, act, kv_bits, kv_group_size)
    conv_dim = args.mamba_d_ssm + 2 * args.mamba_n_groups * args.mamba_d_state
    k = args.mamba_d_conv
    ssm = batch * args.mamba_n_heads * args.mamba_d_head * args.mamba_d_state * 4  # float32
    conv = batch * (k - 1) * conv_dim * act  # raw conv inputs, activation dtype
    # cache.py: raw [xBC | dt] rows of up to 2 * max_rollback tokens (plus the K-1
    # conv-context rows) and the SSM state at the window's start.
    rollback = batch * (k - 1 + 2 * max_rollback) * (conv_dim + args.mamba_n_heads) * act + ssm
    transient = prefill_transient(args, act, step, positions, batch, kv_bits, kv_group_size, device)
    return Plan(sizes.name, sizes.weights_dtype, context, batch, prefill_step, kv_bits,
                kv_group_size, max_kv_size, args.num_hidden_layers, positions, sizes.weights,
                kv_per_layer, conv, ssm, rollback, transient, sizes.note)


def longest_context(sizes: ModelSizes, budget: int, limit: int, **options) -> int:
    """The longest context (<= limit) whose planned peak fits in `budget` bytes; 0 if none."""
    if plan(sizes, 1, **options).total > budget:
        return 0
    low, high = 1, limit
    if plan(sizes, high, **options).total <= budget:
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if plan(sizes, mid, **options).total <= budget:
            low = mid
        else:
            high = mid
    return low


# --- printing --------------------------------------------------------------------


def _gb(n: float) -> str:
    return f"{n / GiB:.2f} GB" if n >= GiB / 10 else f"{n / (1 << 20):.1f} MB"


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else f"{n:,}"


def report(sizes: ModelSizes, p: Plan, options: dict) -> str:
    lines = [
        f"Falcon-H1 {p.model}: weights {p.weights_dtype}, context {p.context:,} tokens, "
        f"batch {p.batch}, prefill step {p.prefill_step}"
        + (f", K/V {p.kv_bits}-bit (g{p.kv_group_size})" if p.kv_bits else "")
        + (f", K/V window {p.max_kv_size:,} (RotatingKVCache, keep 4)" if p.max_kv_size else ""),
    ]
    if p.note:
        lines.append(f"  note: {p.note}")
    per_layer_weights = max(sizes.weights_per_layer) if sizes.weights_per_layer else 0
    rows = [
        ("weights", p.weights, per_layer_weights),
        (f"attention K/V ({p.kv_positions:,} positions)", p.kv, p.kv_per_layer),
        ("conv state", p.layers * p.conv_per_layer, p.conv_per_layer),
        ("SSM state (float32)", p.layers * p.ssm_per_layer, p.ssm_per_layer),
        ("rollback window", p.rollback, p.rollback_per_layer),
        (f"prefill step peak ({min(p.prefill_step, p.context)} tokens)", p.prefill_transient, None),
        ("total (peak)", p.total, None),
    ]
    lines.append(f"  {'part':<44}{'total':>12}{'per layer':>12}")
    for name, total, layer in rows:
        lines.append(f"  {name:<44}{_gb(total):>12}{_gb(layer) if layer is not None else '':>12}")
    lines.append("  Macs (default GPU working set: 2/3 of RAM up to 36 GB, 3/4 above):")
    limit = sizes.args.max_position_embeddings
    for ram in MAC_SIZES_GB:
        budget = gpu_working_set(ram)
        fits = "fits" if p.total <= budget else "no"
        longest = longest_context(sizes, budget, limit, **options)
        longest_text = "none" if longest == 0 else (
            f"{_tokens(longest)} (all {_tokens(limit)})" if longest == limit else f"{longest:,}")
        lines.append(f"    {ram:>3} GB (GPU {budget / GiB:5.1f} GB): {fits:<5} longest context {longest_text}")
    return "\n".join(lines)


MARKDOWN_CONTEXTS = (8192, 32768, 262144)
MARKDOWN_VARIANTS = (  # (label, weight bits, K/V bits): what people run on a Mac
    ("bf16, K/V bf16", None, None),
    ("bf16, K/V 8-bit", None, 8),
    ("4-bit, K/V bf16", 4, None),
    ("4-bit, K/V 8-bit", 4, 8),
)


def markdown(prefill_step: int = 2048) -> str:
    """README tables: every released shape at 8K, 32K and 256K tokens."""
    out = [
        f"Planned peak memory (prefill in steps of {prefill_step}, batch 1; weights + K/V + "
        "conv/SSM state + rollback window + the last prefill step), and the longest context "
        "that fits under macOS's default GPU working set (2/3 of RAM up to 36 GB, 3/4 above):",
        "",
        "| model | weights, K/V | weights | K/V at 256K | state | "
        + " | ".join(f"peak at {_tokens(c)}" for c in MARKDOWN_CONTEXTS)
        + " | longest on 16 / 32 / 64 / 128 GB |",
        "|---" * (6 + len(MARKDOWN_CONTEXTS)) + "|",
    ]
    for name in RELEASED:
        for label, bits, kv_bits in MARKDOWN_VARIANTS:
            sizes = shape_sizes(name, bits)
            options = dict(prefill_step=prefill_step, kv_bits=kv_bits)
            plans = [plan(sizes, c, **options) for c in MARKDOWN_CONTEXTS]
            limit = sizes.args.max_position_embeddings
            longest = []
            for ram in (16, 32, 64, 128):
                n = longest_context(sizes, gpu_working_set(ram), limit, **options)
                longest.append("-" if n == 0 else ("all" if n == limit else _tokens(n // 1024 * 1024)
                                                   if n >= 1024 else str(n)))
            big = plans[-1]
            out.append(
                f"| {name}{' *' if name in ASSUMED else ''} | {label} | {_gb(big.weights)} | {_gb(big.kv)} "
                f"| {_gb(big.state + big.rollback)} | "
                + " | ".join(_gb(p.total) for p in plans)
                + f" | {' / '.join(longest)} |"
            )
    out += ["", "Context limits: 0.5B 16K, 1.5B/1.5B-Deep/3B 128K, 7B/34B 256K (\"all\": the "
            "whole trained context fits; columns past a model's limit are arithmetic only). "
            "* weights approximate: "
            + "; ".join(f"{k}: {v}" for k, v in ASSUMED.items()) + "."]
    return "\n".join(out)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m mlx_falcon_h1.memory",
        description="Memory a Falcon-H1 needs at a given context: weights, K/V, conv and SSM "
        "state, rollback window, prefill peak, and what fits on each Mac.")
    parser.add_argument("--model", help=f"a model folder, or a released shape: {', '.join(RELEASED)} "
                        "(default: every released shape)")
    parser.add_argument("--context", type=int, default=262144, help="tokens held (prompt + generated)")
    parser.add_argument("--bits", type=int, choices=(2, 3, 4, 5, 6, 8),
                        help="a released shape's weights quantized to this many bits (default bf16)")
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size of --bits")
    parser.add_argument("--kv-bits", type=int, choices=(2, 3, 4, 5, 6, 8), help="quantized K/V (mlx-lm)")
    parser.add_argument("--kv-group-size", type=int, default=64)
    parser.add_argument("--max-kv-size", type=int, help="bound the attention K/V to this many tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prefill-step-size", type=int, default=2048)
    parser.add_argument("--max-rollback", type=int, default=MAX_ROLLBACK_TOKENS,
                        help="model.rollback_tokens (the rollback window, cache.py)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="gpu: a Mac (Metal, the default); cpu: MLX's CPU backend, whose "
                             "attention holds a prefill step's scores")
    parser.add_argument("--json", help="also write the plan(s) to this file")
    parser.add_argument("--markdown", action="store_true",
                        help="print the README tables for every released shape and exit")
    a = parser.parse_args(argv)
    if a.markdown:
        print(markdown(a.prefill_step_size))
        return 0
    options = dict(batch=a.batch, prefill_step=a.prefill_step_size, kv_bits=a.kv_bits,
                   kv_group_size=a.kv_group_size, max_kv_size=a.max_kv_size,
                   max_rollback=a.max_rollback, device=a.device)
    plans = []
    try:
        for name in [a.model] if a.model else list(RELEASED):
            sizes = model_sizes(name, a.bits, a.group_size)
            p = plan(sizes, a.context, **options)
            print(report(sizes, p, options), end="\n\n")
            plans.append(dict(asdict(p), kv=p.kv, state=p.state, rollback=p.rollback, total=p.total))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.json:
        Path(a.json).write_text(json.dumps(plans, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    from .cli import run

    run(main)
