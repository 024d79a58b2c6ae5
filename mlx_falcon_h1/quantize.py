"""Calibrated low-bit quantization of Falcon-H1: GPTQ, AWQ, DWQ and dynamic mixed precision.

    mlx-falcon-h1-convert --hf-path SRC --mlx-path OUT -q --q-bits 4 --method gptq
    python -m mlx_falcon_h1.quantize --hf-path SRC --mlx-path OUT --q-bits 3 --q-group-size 32 --method dwq

mlx-lm 0.32 ships the four methods (mlx_lm/quant/), but they fetch their
calibration data from the Hub, run mlx-lm's own `falcon_h1` and have no AWQ layer
map for it. Here they run on this package's exact model, from the converter (so
the output is a normal converted folder: muP multipliers folded, A_log, D,
dt_bias, conv1d and norms never quantized, quality report, model card), with
calibration text from a local file. mlx-lm's generic pieces are called where
they fit (AWQ's clip search, DWQ's KL loss, dynamic quantization's sensitivity
estimate); what depends on the layer's structure is written here.

- gptq: per linear layer, quantize column by column and push each column's
  rounding error onto the columns not yet quantized, weighted by the inverse
  Hessian of the layer's inputs (Frantar et al. 2022, arXiv:2210.17323).
  Layer by layer: a decoder layer's inputs come from the already quantized
  layers before it. lm_head too (its inputs: the final norm's output); the
  embedding has no inputs to weigh by and is quantized plainly.
- awq: per-channel scales s moved from a layer's input onto its weights
  (W x = (W diag(s)) (x / s)) so the channels with large activations lose less
  to rounding, with 1/s folded exactly into the op that makes x; then a per-group
  clip search (Lin et al. 2023, arXiv:2306.00978). Scale groups below (AWQ_GROUPS).
- dwq: start from plain quantization and learn the scales and biases of every
  quantized layer by distillation: minimise KL(float || quantized) of the
  next-token distributions at temperature 2 on the calibration text (mlx-lm's DWQ).
  The float model's logits are computed first, one layer at a time, so teacher
  and student are never in memory together.
- dynamic: estimate each layer's sensitivity (first-order change of that KL
  when the layer goes from high to low bits, mlx-lm's estimate) and give the
  most sensitive layers more bits, within the size of the plain setting.

AWQ scale groups of a Falcon-H1 decoder layer (the math: a scale can move from
x to W only across a linear map, i.e. where nothing nonlinear sits between the
op that makes x and the weight that reads it):

1. input_layernorm -> q_proj, k_proj, v_proj AND mamba.in_proj: one norm output
   feeds attention and the Mamba mixer, and the norm's weight is the only place
   1/s can go (dividing it scales what both branches see), so one scale serves
   all four. It is searched on the sum of both branches' outputs.
2. v_proj -> o_proj: attention mixes value vectors across positions with
   weights that do not depend on v, so scaling v's output channels scales the
   attention output's channels alike. With GQA each kv head serves
   n_heads / n_kv_heads query heads, so o_proj's input scale is v's, repeated
   over the query heads of each kv head (searched on their mean activation).
3. mamba.norm (the gated RMSNorm, `mamba_rms_norm`) -> out_proj: the norm's
   weight multiplies after the per-group statistics, and the SiLU gate is a
   per-channel factor, so w/s then out_proj*s is exact for both gate orders and
   any group count. Without the gated norm there is no such op: out_proj gets
   no scale (clip only).
4. pre_ff_layernorm -> gate_proj, up_proj.
5. up_proj -> down_proj: up's output multiplies SiLU(gate) elementwise.
6. final_layernorm -> lm_head (untied heads only): lm_head is the layer most
   sensitive to quantization in the shipped model.

None of in_proj's row blocks can carry a scale forward: x, B and C pass the
causal conv's bias and a SiLU, z passes the SiLU gate, dt passes softplus with
dt_bias; each is nonlinear before the next weight. So in_proj is scaled on its
input side only (group 1). The muP multipliers are folded into the weights
before calibration (config.json then states 1.0 for them); a scalar
multiplier would commute with a per-channel scale anyway.
"""

import argparse
import copy
import json
import math
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

METHODS = ("gptq", "awq", "dwq", "dynamic")


@dataclass
class CalibrationSettings:
    """The calibration flags (`add_arguments`), with their defaults."""

    method: str = "gptq"
    calibration_data: Optional[str] = None  # file or folder; None: the shipped text
    num_samples: int = 64
    sequence_length: int = 256
    seed: int = 0
    batch_size: int = 8
    n_grid: int = 20  # AWQ: scale ratios and clip ratios searched
    learning_rate: float = 1e-4  # DWQ
    epochs: int = 4  # DWQ: passes over the calibration samples
    temperature: float = 2.0  # DWQ, as mlx-lm's
    dwq_init: str = "plain"  # DWQ: the quantization it starts from: plain, gptq or awq
    grad_checkpoint: bool = False  # DWQ: recompute each layer in the backward pass (big models)
    target_bpw: Optional[float] = None  # dynamic: default = the plain setting's size
    low_bits: Optional[int] = None  # dynamic: default = --q-bits, twice the group size
    low_group_size: Optional[int] = None
    high_bits: Optional[int] = None  # dynamic: default = --q-bits + 1 at --q-group-size
    high_group_size: Optional[int] = None

    def check(self):
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.dwq_init not in ("plain", "gptq", "awq"):
            raise ValueError(f"--dwq-init {self.dwq_init!r}: choose plain, gptq or awq")
        for name in ("num_samples", "sequence_length", "batch_size", "n_grid", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")


# ----------------------------------------------------------------------------- data


def default_calibration_path() -> Path:
    """The shipped calibration text: Python standard-library files from the shipped
    model's training split, none of them in the held-out evaluation text (data/README.md)."""
    from importlib import resources

    return Path(str(resources.files("mlx_falcon_h1") / "data" / "calibration.txt"))


def _jsonl_texts(file: Path, tokenizer) -> List[str]:
    """Texts of an mlx-lm dataset file: {"text"}, {"prompt", "completion"} or {"messages"}."""
    texts = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}:{n}: not JSON ({e.msg})") from None
        if "text" in row:
            texts.append(row["text"])
        elif "prompt" in row and "completion" in row:
            texts.append(row["prompt"] + row["completion"])
        elif "messages" in row and getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(row["messages"], tokenize=False))
        elif "messages" in row:
            texts.append("\n".join(m.get("content", "") for m in row["messages"]))
        else:
            raise ValueError(
                f"{file}:{n}: expected a 'text', 'prompt'+'completion' or 'messages' field, "
                f"got {sorted(row)}"
            )
    return texts


def calibration_texts(path: Optional[str], tokenizer) -> Tuple[List[str], str]:
    """(texts, description) from a .txt / .jsonl file or a folder of them (sorted)."""
    file = Path(path) if path else default_calibration_path()
    if file.is_dir():
        files = sorted(f for f in file.rglob("*") if f.suffix in (".txt", ".jsonl"))
        if not files:
            raise ValueError(f"{file}: no .txt or .jsonl files for calibration")
    elif file.is_file():
        files = [file]
    else:
        raise ValueError(f"--calibration-data {file}: no such file or folder")
    texts = []
    for f in files:
        texts += _jsonl_texts(f, tokenizer) if f.suffix == ".jsonl" else [f.read_text(encoding="utf-8")]
    from .evaluate import default_text_path

    if any(f.resolve() == default_text_path().resolve() for f in files):
        warnings.warn(
            f"{file}: calibrating on the held-out evaluation text makes its quality "
            "numbers optimistic; calibrate on other text",
            stacklevel=2,
        )
    return texts, str(file) if path else f"{file.name} (shipped default)"


def calibration_tokens(tokenizer, settings: CalibrationSettings) -> Tuple[mx.array, str]:
    """(samples (N, L) int32, description): the texts tokenized and joined, cut
    into non-overlapping windows of --sequence-length, --num-samples of them
    picked at random with --seed (all of them when there are fewer)."""
    texts, described = calibration_texts(settings.calibration_data, tokenizer)
    ids = []
    for text in texts:
        try:
            ids += tokenizer.encode(text, verbose=False)  # no "longer than the model" notice
        except TypeError:
            ids += tokenizer.encode(text)
    L = settings.sequence_length
    windows = len(ids) // L
    if windows == 0:
        raise ValueError(
            f"{described}: {len(ids)} tokens, fewer than one --sequence-length {L} window"
        )
    tokens = np.asarray(ids[: windows * L], dtype=np.int32).reshape(windows, L)
    pick = np.random.default_rng(settings.seed).permutation(windows)[: settings.num_samples]
    if windows < settings.num_samples:
        print(f"[calibration] {described}: only {windows} windows of {L} tokens, using all")
    return mx.array(tokens[np.sort(pick)]), described


# ----------------------------------------------------------------------------- helpers


def quantizable(module: nn.Module, group_size: int) -> bool:
    """What the converter quantizes: Linear and Embedding layers whose input size
    fits the group size (conv1d, norms and the SSM parameters have no to_quantized)."""
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def fake_quantize(w: mx.array, bits: int, group_size: int) -> mx.array:
    """w rounded to the affine grid it would be stored on."""
    return mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


def pack(q: np.ndarray, bits: int) -> mx.array:
    """Integers q (O, I) in [0, 2**bits) packed as MLX's affine quantization stores
    them: a little-endian bit stream per row, read as uint32 (checked in the tests)."""
    q = np.asarray(q, dtype=np.uint32)
    out = []
    for rows in np.array_split(q, max(1, q.size // (1 << 22)), axis=0):  # bounds the bit array
        bits_arr = ((rows[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
        packed = np.packbits(bits_arr.reshape(rows.shape[0], -1), axis=-1, bitorder="little")
        out.append(packed.view(np.uint32))
    return mx.array(np.concatenate(out, axis=0))


class _DequantizedLinear(nn.Module):
    """A QuantizedLinear computed as dequantize + matmul, with the same parameter
    names. On the CPU, MLX's quantized matmul is ~20x slower than dequantizing and
    calling BLAS (measured here: 3.2 s vs 0.13 s for 2040 x 256 @ 256 x 4096),
    and the dequantized form is differentiable in scales and biases (DWQ)."""

    def __init__(self, q: nn.QuantizedLinear):
        super().__init__()
        self.group_size, self.bits = q.group_size, q.bits
        self.weight, self.scales, self.biases = q.weight, q.scales, q.biases
        if "bias" in q:
            self.bias = q.bias

    def dense(self) -> mx.array:
        w = mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)
        return w.astype(mx.float32)

    def __call__(self, x):  # in float32: calibration's arithmetic, not bfloat16's
        y = x.astype(mx.float32) @ self.dense().T
        return y + self.bias if "bias" in self else y


class _DequantizedEmbedding(_DequantizedLinear):
    def __call__(self, ids):
        return mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids],
                             group_size=self.group_size, bits=self.bits).astype(mx.float32)  # fmt: skip

    def as_linear(self, x):
        return x.astype(mx.float32) @ self.dense().T


def dequantized_form(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Swap every affine-quantized leaf of `module` for its dequantize + matmul
    twin (same math, same parameter names); returns what to restore_modules()."""
    swapped = []
    for p, m in tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, nn.QuantizedLinear) and m.mode == "affine":
            swapped.append((p, m))
            _set(module, p, _DequantizedLinear(m))
        elif isinstance(m, nn.QuantizedEmbedding) and m.mode == "affine":
            swapped.append((p, m))
            _set(module, p, _DequantizedEmbedding(m))
    return swapped


def restore_modules(module: nn.Module, swapped: List[Tuple[str, nn.Module]]) -> None:
    """Put the quantized modules back, with the twins' (possibly learned) parameters."""
    for p, original in swapped:
        twin = _get(module, p)
        original.update({k: twin[k] for k in ("scales", "biases")})
        _set(module, p, original)


def _quantized_linear(layer: nn.Linear, q, scales, biases, bits, group_size) -> nn.QuantizedLinear:
    out_dims, in_dims = layer.weight.shape
    ql = nn.QuantizedLinear(in_dims, out_dims, bias="bias" in layer, group_size=group_size, bits=bits)
    ql.weight, ql.scales, ql.biases = pack(q, bits), scales, biases
    if "bias" in layer:
        ql.bias = layer.bias
    return ql


def _set(root: nn.Module, path: str, module: nn.Module) -> None:
    root.update_modules(tree_unflatten([(path, module)]))


def _get(root: nn.Module, path: str) -> nn.Module:
    for key in path.split("."):
        root = root[int(key)] if isinstance(root, list) else root[key]
    return root


def _float32(module: nn.Module) -> dict:
    """Cast `module`'s floating parameters to float32 in place; returns the originals."""
    originals = module.parameters()
    module.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, originals))
    return originals


def _embed(model, tokens: mx.array) -> mx.array:
    inner = model.model
    h = inner.embed_tokens(tokens).astype(mx.float32)
    return h if inner.embedding_multiplier == 1.0 else h * inner.embedding_multiplier


def _head(model, h: mx.array) -> mx.array:
    h = model.model.final_layernorm(h)
    logits = model.model.embed_tokens.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)
    m = model.args.lm_head_multiplier
    return logits if m == 1.0 else logits * m


def _run(fn: Callable, x: mx.array, batch_size: int) -> mx.array:
    """fn over x (N, ...) in batches, evaluated batch by batch."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        y = fn(x[i : i + batch_size])
        mx.eval(y)
        out.append(y)
    return mx.concatenate(out, axis=0)


def _decoder(layer) -> Callable:
    return lambda x: layer(x, "causal" if x.shape[1] > 1 else None, None).astype(mx.float32)


class _Capture(nn.Module):
    """Wraps a layer; calls `record(x)` with each input before running it."""

    def __init__(self, module, record):
        super().__init__()
        self.module = module
        self._record = record

    def __call__(self, x, *args, **kwargs):
        self._record(x)
        return self.module(x, *args, **kwargs)


def _linears(layer: nn.Module, group_size: int) -> Dict[str, nn.Module]:
    return {
        p: m
        for p, m in tree_flatten(layer.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, nn.Linear) and quantizable(m, group_size)
    }


def _capture_inputs(layer, paths, x, batch_size, reduce) -> Dict[str, object]:
    """Run `layer` on x with each linear at `paths` wrapped; reduce(state, input)
    folds its inputs into one value per path (a Hessian, or the inputs themselves)."""
    state: Dict[str, object] = {p: None for p in paths}
    originals = {p: _get(layer, p) for p in paths}

    def recorder(p):
        def record(inp):
            state[p] = reduce(state[p], inp.astype(mx.float32))

        return record

    for p, m in originals.items():
        _set(layer, p, _Capture(m, recorder(p)))
    try:
        for i in range(0, x.shape[0], batch_size):
            _decoder(layer)(x[i : i + batch_size])
            mx.eval([v for v in state.values() if v is not None])
    finally:
        for p, m in originals.items():
            _set(layer, p, m)
    return state


# ----------------------------------------------------------------------------- GPTQ


SHRINK = np.linspace(1.0, 0.6, 9)  # range fractions tried per group (GPTQ, embeddings)


def group_grid(w: np.ndarray, weight: np.ndarray, bits: int, scale_dtype: mx.Dtype):
    """Scale and bias (O, 1) for one group of columns w (O, g): of the ranges
    around the middle of [min, max], p times as wide, for p in SHRINK, the one whose rounding error
    sum_k weight_k (w_k - dq_k)^2 is least per row (weight: (g,), e.g. diag H).
    Rounded to scale_dtype, as they will be stored."""
    n_bins = 2**bits - 1
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    best = best_s = best_b = None
    for p in SHRINK:
        s = np.maximum(2 * half * p / n_bins, 1e-8)
        b = mid - half * p
        s = np.array(mx.array(s, dtype=mx.float32).astype(scale_dtype).astype(mx.float32), dtype=np.float64)
        b = np.array(mx.array(b, dtype=mx.float32).astype(scale_dtype).astype(mx.float32), dtype=np.float64)
        dq = s * np.clip(np.round((w - b) / s), 0, n_bins) + b
        err = (((w - dq) ** 2) * weight).sum(axis=1, keepdims=True)
        if best is None:
            best, best_s, best_b = err, s, b
        else:
            better = err < best
            best = np.where(better, err, best)
            best_s, best_b = np.where(better, s, best_s), np.where(better, b, best_b)
    return best_s, best_b


def gptq_weight(w: mx.array, hessian: mx.array, bits: int, group_size: int,
                scale_dtype: mx.Dtype, damp: float = 0.01):  # fmt: skip
    """GPTQ for one weight w (O, I) given H = sum x x^T of its inputs (I, I).

    Returns (q (O, I) integers, scales, biases (O, I / group_size) in
    scale_dtype). Each group's grid is chosen when the group is reached, from
    the group's columns as updated so far (group_grid, weighted by diag H).
    Columns are taken in order, errors spread over the later columns with the
    upper Cholesky factor of H^-1 (the paper's Algorithm 1, with its lazy block
    updates at group boundaries).
    """
    W = np.array(w.astype(mx.float32), dtype=np.float64)
    H = np.array(hessian, dtype=np.float64)
    dead = np.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    n_bins = 2**bits - 1
    O, I = W.shape
    Q = np.zeros((O, I), dtype=np.uint32)
    all_scales, all_biases = [], []
    for i in range(0, I, group_size):
        j = i + group_size
        s64, b64 = group_grid(W[:, i:j], np.diag(H)[i:j], bits, scale_dtype)
        all_scales.append(mx.array(s64, dtype=mx.float32).astype(scale_dtype))
        all_biases.append(mx.array(b64, dtype=mx.float32).astype(scale_dtype))
        E = np.zeros((O, group_size))
        for k in range(i, j):
            q = np.clip(np.round((W[:, k : k + 1] - b64) / s64), 0, n_bins)
            Q[:, k] = q[:, 0]
            e = (W[:, k : k + 1] - (s64 * q + b64)) / U[k, k]
            W[:, k + 1 : j] -= e @ U[k : k + 1, k + 1 : j]
            E[:, k - i] = e[:, 0]
        W[:, j:] -= E @ U[i:j, j:]
    return Q, mx.concatenate(all_scales, axis=1), mx.concatenate(all_biases, axis=1)


def _hessian(state, x):
    x = x.reshape(-1, x.shape[-1])
    h = x.T @ x
    return h if state is None else state + h


def gptq_quantize(model, tokens, bits, group_size, scale_dtype, settings, log=print) -> None:
    """GPTQ every quantizable Linear, decoder layer by decoder layer, in place."""
    embed = model.model.embed_tokens
    if quantizable(embed, group_size):
        model.model.embed_tokens = embed.to_quantized(group_size=group_size, bits=bits)
    x = _run(lambda t: _embed(model, t), tokens, settings.batch_size)

    def quantize_layer(root, paths, x):
        hessians = _capture_inputs(root, paths, x, settings.batch_size, _hessian)
        for p in paths:
            layer = _get(root, p)
            q, s, b = gptq_weight(layer.weight, hessians.pop(p), bits, group_size, scale_dtype)
            _set(root, p, _quantized_linear(layer, q, s, b, bits, group_size))

    for n, layer in enumerate(model.layers):
        originals = _float32(layer)
        quantize_layer(layer, list(_linears(layer, group_size)), x)
        swapped = dequantized_form(layer)
        x = _run(_decoder(layer), x, settings.batch_size)  # through the quantized layer
        restore_modules(layer, swapped)
        del originals
        mx.clear_cache()
        log(f"[gptq] layer {n + 1}/{len(model.layers)}")
    if not model.args.tie_word_embeddings and quantizable(model.lm_head, group_size):
        h = _run(lambda v: model.model.final_layernorm(v), x, settings.batch_size)
        H = None
        for i in range(0, h.shape[0], settings.batch_size):
            H = _hessian(H, h[i : i + settings.batch_size])
            mx.eval(H)
        q, s, b = gptq_weight(model.lm_head.weight, H, bits, group_size, scale_dtype)
        model.lm_head = _quantized_linear(model.lm_head, q, s, b, bits, group_size)


# ----------------------------------------------------------------------------- AWQ


@dataclass
class ScaleGroup:
    """One AWQ scale: divided out of `prev` (a norm's weight, or a Linear's output
    rows), multiplied into the input columns of `layers`; searched on `block`."""

    prev: str
    layers: List[str]
    block: Callable  # (decoder layer, its input x) -> what the scale must not change
    repeat: int = 1  # GQA: query heads per kv head; prev has 1/repeat of the channels
    head_dim: int = 0


def _attn_and_mixer(layer, x):
    n = layer.input_layernorm(x)
    mask = "causal" if x.shape[1] > 1 else None
    return layer.mamba(n, None) + layer.self_attn(n, mask, None)


def awq_groups(args) -> List[ScaleGroup]:
    """The scale groups of one decoder layer (module docstring: why these)."""
    mask = lambda x: "causal" if x.shape[1] > 1 else None  # noqa: E731
    groups = [
        ScaleGroup("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mamba.in_proj"],
                   _attn_and_mixer),
        ScaleGroup("self_attn.v_proj", ["self_attn.o_proj"],
                   lambda l, x: l.self_attn(l.input_layernorm(x), mask(x), None),
                   repeat=args.num_attention_heads // args.num_key_value_heads, head_dim=args.head_dim),
    ]  # fmt: skip
    if args.mamba_rms_norm:
        groups.append(ScaleGroup("mamba.norm", ["mamba.out_proj"], lambda l, x: l.mamba(l.input_layernorm(x), None)))

    def mlp(l, x):
        h = x + _attn_and_mixer(l, x)
        return l.feed_forward(l.pre_ff_layernorm(h))

    groups += [
        ScaleGroup("pre_ff_layernorm", ["feed_forward.gate_proj", "feed_forward.up_proj"], mlp),
        ScaleGroup("feed_forward.up_proj", ["feed_forward.down_proj"], mlp),
    ]
    return groups


def apply_scale(root: nn.Module, prev: str, layers: Sequence[str], scales: mx.array,
                repeat: int = 1, head_dim: int = 0):  # fmt: skip
    """Divide `prev`'s output by scales and multiply the input columns of
    `layers` by them: the function computed is unchanged (up to rounding).
    scales: (C,) for the consumers' C input channels. With repeat > 1 (GQA: the
    consumer is o_proj, channels (n_kv, repeat, head_dim)) the scales must be
    equal over the repeat axis and prev (v_proj) gets one copy."""
    prev_scales = scales
    if repeat > 1:
        prev_scales = scales.reshape(-1, repeat, head_dim)[:, 0].reshape(-1)
    p = _get(root, prev)
    if isinstance(p, nn.Linear):  # output rows
        p.weight = (p.weight.astype(mx.float32) / prev_scales[:, None]).astype(p.weight.dtype)
        if "bias" in p:
            p.bias = (p.bias.astype(mx.float32) / prev_scales).astype(p.bias.dtype)
    elif "weight" in p and p.weight.shape == prev_scales.shape:  # RMSNorm, gated RMSNorm
        p.weight = (p.weight.astype(mx.float32) / prev_scales).astype(p.weight.dtype)
    else:
        raise TypeError(f"AWQ cannot fold a scale into {prev} ({type(p).__name__})")
    for name in layers:
        m = _get(root, name)
        m.weight = (m.weight.astype(mx.float32) * scales).astype(m.weight.dtype)


def awq_quantize(model, tokens, bits, group_size, scale_dtype, settings, log=print) -> None:
    """AWQ: scale search per group, clip search per linear, then quantize; layer by layer."""
    from mlx_lm.quant.awq import search_best_clip

    qf = lambda w: fake_quantize(w, bits, group_size)  # noqa: E731
    args = model.args
    x = _run(lambda t: _embed(model, t), tokens, settings.batch_size)
    subsample = max(1, x.shape[0] // 16)  # samples whose inputs are kept for the searches

    def concat(state, inp):
        return inp if state is None else mx.concatenate([state, inp], axis=0)

    for n, layer in enumerate(model.layers):
        originals = _float32(layer)
        y = _run(_decoder(layer), x, settings.batch_size)  # float outputs: next layer's inputs
        paths = list(_linears(layer, group_size))
        xs = x[::subsample]
        feats = _capture_inputs(layer, paths, xs, settings.batch_size, concat)

        def loss(block, target):
            out = _run(lambda v: block(layer, v).astype(mx.float32), xs, settings.batch_size)
            return ((out - target) ** 2).mean().item()

        plain = copy.deepcopy(layer)
        nn.quantize(plain, group_size, bits, class_predicate=lambda p, m: p in paths)
        dequantized_form(plain)
        loss_before = ((_run(_decoder(plain), xs, settings.batch_size) - y[::subsample]) ** 2).mean().item()
        del plain
        float_params = layer.parameters()

        for g in awq_groups(args):
            if not all(p in paths for p in g.layers):
                continue
            target = _run(lambda v: g.block(layer, v).astype(mx.float32), xs, settings.batch_size)
            x_mean = feats[g.layers[0]].abs().reshape(-1, feats[g.layers[0]].shape[-1]).mean(axis=0)
            if g.repeat > 1:  # one scale per kv channel: the mean over the query heads it serves
                x_mean = x_mean.reshape(-1, g.repeat, g.head_dim).mean(axis=1, keepdims=True)
                x_mean = mx.repeat(x_mean, g.repeat, axis=1).reshape(-1)
            weights = {p: _get(layer, p).weight for p in g.layers}
            best, best_scales = math.inf, None
            for r in range(settings.n_grid):
                s = mx.maximum(x_mean ** (r / settings.n_grid), 1e-4)
                s = s / mx.sqrt(s.max() * s.min())
                for p, w in weights.items():
                    _get(layer, p).weight = qf(w * s) / s
                err = loss(g.block, target)
                if err < best:
                    best, best_scales = err, s
            for p, w in weights.items():
                _get(layer, p).weight = w
            apply_scale(layer, g.prev, g.layers, best_scales, g.repeat, g.head_dim)
            for p in g.layers:
                feats[p] = feats[p] / best_scales

        for p in paths:
            if p.endswith(("q_proj", "k_proj")):  # as mlx-lm: scores are not an MSE target
                continue
            m = _get(layer, p)
            m.input_feat = feats[p]
            m.weight = search_best_clip(m, qf, group_size, settings.n_grid)
            del m.input_feat
        nn.quantize(layer, group_size, bits, class_predicate=lambda p, m: p in paths)
        swapped = dequantized_form(layer)
        loss_after = ((_run(_decoder(layer), xs, settings.batch_size) - y[::subsample]) ** 2).mean().item()
        restore_modules(layer, swapped)
        if loss_after > loss_before:  # as mlx-lm: never worse than plain on the calibration text
            model.layers[n] = layer = type(layer)(args)
            layer.update(float_params)
            _float32(layer)
            nn.quantize(layer, group_size, bits, class_predicate=lambda p, m: p in paths)
            log(f"[awq] layer {n + 1}: no gain over plain ({loss_after:.3g} vs {loss_before:.3g}), kept plain")
        else:
            log(f"[awq] layer {n + 1}/{len(model.layers)}: output MSE {loss_before:.3g} -> {loss_after:.3g}")
        del originals, feats
        x = y
        mx.clear_cache()

    if not args.tie_word_embeddings and quantizable(model.lm_head, group_size):
        norm, head = model.model.final_layernorm, model.lm_head
        _float32(norm), _float32(head)
        h = _run(norm, x, settings.batch_size)[::subsample]
        target = _run(head, h, settings.batch_size)
        x_mean = h.abs().reshape(-1, h.shape[-1]).mean(axis=0)
        w = head.weight
        best, best_scales = math.inf, None
        for r in range(settings.n_grid):
            s = mx.maximum(x_mean ** (r / settings.n_grid), 1e-4)
            s = s / mx.sqrt(s.max() * s.min())
            err = ((_run(lambda v: v @ (qf(w * s) / s).T, h, settings.batch_size) - target) ** 2).mean().item()
            if err < best:
                best, best_scales = err, s
        apply_scale(model.model, "final_layernorm", [], best_scales)
        head.weight = w * best_scales
        head.input_feat = h / best_scales
        head.weight = search_best_clip(head, qf, group_size, settings.n_grid)
        del head.input_feat
        model.lm_head = head.to_quantized(group_size=group_size, bits=bits)
    embed = model.model.embed_tokens
    if quantizable(embed, group_size):  # no inputs to weigh by: plain
        model.model.embed_tokens = embed.to_quantized(group_size=group_size, bits=bits)


# ----------------------------------------------------------------------------- DWQ


def teacher_logits(model, tokens, settings, top_k: int = 8192):
    """The float model's logits on the calibration samples, one decoder layer at a
    time in float32 (so a big model never needs a float32 copy). For vocabularies
    over top_k, the top_k largest with their indices (mlx-lm's DWQ does the same)."""
    x = _run(lambda t: _embed(model, t), tokens, settings.batch_size)
    for layer in model.layers:
        originals = _float32(layer)
        x = _run(_decoder(layer), x, settings.batch_size)
        layer.update(originals)
    head = (model.model.final_layernorm, getattr(model, "lm_head", None), model.model.embed_tokens)
    head_params = [m for m in head if m is not None]
    saved = [_float32(m) for m in head_params]
    logits = _run(lambda v: _head(model, v).astype(mx.float32), x, settings.batch_size)
    for m, p in zip(head_params, saved):
        m.update(p)
    if logits.shape[-1] <= top_k:
        return logits, None
    idx = mx.argpartition(logits, kth=-top_k, axis=-1)[..., -top_k:]
    return mx.take_along_axis(logits, idx, axis=-1), idx


def dwq_quantize(model, tokens, bits, group_size, scale_dtype, settings, log=print) -> None:
    """Plain (or --dwq-init gptq / awq) quantization, then the scales and biases
    learned by distillation."""
    from mlx_lm.tuner.losses import kl_div_loss

    n_valid = max(1, tokens.shape[0] // 8)
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(tokens.shape[0])
    valid, train = tokens[mx.array(np.sort(order[:n_valid]))], tokens[mx.array(np.sort(order[n_valid:]))]
    inputs = lambda t: t[:, :-1]  # noqa: E731
    t_train = teacher_logits(model, inputs(train), settings)
    t_valid = teacher_logits(model, inputs(valid), settings)

    if settings.dwq_init == "plain":
        nn.quantize(model, group_size, bits, class_predicate=lambda p, m: quantizable(m, group_size))
    else:
        init = {"gptq": gptq_quantize, "awq": awq_quantize}[settings.dwq_init]
        init(model, train, bits, group_size, scale_dtype, settings, log)
    swapped = dequantized_form(model)
    model.freeze()
    model.apply_to_modules(
        lambda _, m: m.unfreeze(keys=["scales", "biases"], recurse=False)
        if isinstance(m, _DequantizedLinear) else None
    )
    params = tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters())
    dtypes = tree_map(lambda p: p.dtype, model.trainable_parameters())
    scale = 1.0 / settings.temperature

    def loss_fn(params, x, target, idx):
        model.update(params)
        logits = _head_logits(model, x)
        if idx is not None:
            logits = mx.take_along_axis(logits, idx, axis=-1)
        return kl_div_loss(scale * logits, scale * target).mean()

    def evaluate(params) -> float:
        total = 0.0
        for i in range(0, valid.shape[0], settings.batch_size):
            sl = slice(i, i + settings.batch_size)
            idx = None if t_valid[1] is None else t_valid[1][sl]
            total += loss_fn(params, inputs(valid)[sl], t_valid[0][sl], idx).item() * inputs(valid)[sl].shape[0]
        return total / valid.shape[0]

    import mlx.optimizers as optim

    opt = optim.Adam(learning_rate=settings.learning_rate, bias_correction=True)
    grad_fn = mx.value_and_grad(loss_fn)
    with _checkpointed(model.layers[0], settings.grad_checkpoint):
        start = evaluate(params)
        best, best_params = start, params
        for epoch in range(settings.epochs):
            perm = rng.permutation(train.shape[0])
            for i in range(0, train.shape[0], settings.batch_size):
                sl = mx.array(np.sort(perm[i : i + settings.batch_size]))
                idx = None if t_train[1] is None else t_train[1][sl]
                loss, grads = grad_fn(params, inputs(train)[sl], t_train[0][sl], idx)
                params = opt.apply_gradients(grads, params)
                mx.eval(params, opt.state, loss)
            v = evaluate(params)
            log(f"[dwq] epoch {epoch + 1}/{settings.epochs}: held-back KL(T={settings.temperature:g}) {start:.4g} -> {v:.4g}")
            if v < best:
                best, best_params = v, params
    model.update(tree_map(lambda p, d: p.astype(d), best_params, dtypes))
    restore_modules(model, swapped)
    model.unfreeze()
    model.eval()


@contextmanager
def _checkpointed(layer: nn.Module, enabled: bool):
    """mlx-lm's grad_checkpoint (recompute each decoder layer in the backward pass,
    so one layer's activations and dense weights are held at a time), undone on
    exit: it patches the layer's class."""
    cls = type(layer)
    call = cls.__call__
    if enabled:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(layer)
    try:
        yield
    finally:
        cls.__call__ = call


def _head_logits(model, tokens):
    return model(tokens).astype(mx.float32)


# ----------------------------------------------------------------------------- dynamic


def sensitivities(model, tokens, layers: Dict[str, nn.Module], low, high, settings) -> Dict[str, float]:
    """First-order increase of KL(float || quantized) per parameter when each layer
    goes from the high to the low setting, with every layer at low (mlx-lm's
    estimate in dynamic_quant.py): sum(dKL/dW at W_low * (W_low - W_high)) / size.

    The float logits come from teacher_logits; the low-precision weights replace
    the float ones in place and the products are summed batch by batch, so
    memory is one model and one batch's gradients.
    """
    from mlx_lm.tuner.losses import kl_div_loss

    target, idx = teacher_logits(model, tokens, settings)
    high_q = {p: fake_quantize(m.weight, high[0], high[1]) for p, m in layers.items()}
    for p, m in layers.items():
        m.weight = fake_quantize(m.weight, low[0], low[1])
    model.freeze()
    for m in layers.values():
        m.unfreeze(keys=["weight"], recurse=False)

    def loss_fn(params, x, t, i):
        model.update(params)
        logits = model(x).astype(mx.float32)
        if i is not None:
            logits = mx.take_along_axis(logits, i, axis=-1)
        return kl_div_loss(logits, t).mean()

    params = model.trainable_parameters()
    grad_fn = mx.grad(loss_fn)
    total = {p: 0.0 for p in layers}
    for s in range(0, tokens.shape[0], settings.batch_size):
        sl = slice(s, s + settings.batch_size)
        grads = dict(tree_flatten(grad_fn(params, tokens[sl], target[sl], None if idx is None else idx[sl])))
        align = {p: (grads[f"{p}.weight"] * (layers[p].weight - high_q[p])).sum() for p in layers}
        mx.eval(align)
        for p in layers:
            total[p] += align[p].item()
    model.unfreeze()
    return {p: total[p] / (layers[p].weight.size / 1e6) for p in layers}


def dynamic_quantize(model, tokens, bits, group_size, scale_dtype, settings, log=print) -> dict:
    """Mixed precision chosen from measured sensitivities, at the plain setting's size.

    Low: --low-bits/--low-group-size (default: --q-bits at twice the group size,
    at most 128); high: --high-bits/--high-group-size (default: --q-bits + 1 at
    --q-group-size). The most sensitive layers per parameter go high while the
    quantized weights' bits per weight stay within --target-bpw (default: the
    plain setting's, bits + 32 / group size: a bfloat16 scale and bias per
    group). Layers that fit the plain group size but not both others keep the
    plain setting. Returns the per-layer quantization config.
    """
    low = (settings.low_bits or bits, settings.low_group_size or min(2 * group_size, 128))
    high = (settings.high_bits or bits + 1, settings.high_group_size or group_size)
    target = settings.target_bpw or bits + 32 / group_size
    bpw = lambda b, g: b + 32 / g  # noqa: E731
    if not bpw(*low) <= target <= bpw(*high):
        raise ValueError(
            f"--target-bpw {target:g} is outside [{bpw(*low):g}, {bpw(*high):g}], the bits per "
            f"weight of the low ({low[0]}-bit g{low[1]}) and high ({high[0]}-bit g{high[1]}) settings"
        )
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    plain = {p: m for p, m in leaves if quantizable(m, group_size)}
    mixed = {p: m for p, m in leaves if quantizable(m, low[1]) and quantizable(m, high[1])}
    originals = {p: m.weight for p, m in mixed.items()}
    _float32(model)
    sens = sensitivities(model, tokens, mixed, low, high, settings)
    for p, m in mixed.items():
        m.weight = originals[p]
    budget = sum((target - bpw(bits, group_size) if p not in mixed else target - bpw(*low)) * m.weight.size
                 for p, m in {**plain, **mixed}.items())  # fmt: skip
    chosen = []
    for p in sorted(mixed, key=lambda p: -sens[p]):
        extra = (bpw(*high) - bpw(*low)) * mixed[p].weight.size
        if extra <= budget and sens[p] > 0:
            chosen.append(p)
            budget -= extra
    log(f"[dynamic] high ({high[0]}-bit g{high[1]}): {', '.join(chosen) or 'none'}")
    per_layer = {p: {"group_size": group_size, "bits": bits, "mode": "affine"} for p in plain}
    per_layer.update({p: {"group_size": low[1], "bits": low[0], "mode": "affine"} for p in mixed})
    per_layer.update({p: {"group_size": high[1], "bits": high[0], "mode": "affine"} for p in chosen})
    nn.quantize(model, class_predicate=lambda p, m: per_layer.get(p, False))
    return {"sensitivities": sens, "per_layer": per_layer, "low": low, "high": high, "target_bpw": target}


# ----------------------------------------------------------------------------- driver


def calibrated_quantize(model, tokenizer, bits: int, group_size: int, settings: CalibrationSettings,
                        scale_dtype: mx.Dtype = mx.bfloat16, log=print):  # fmt: skip
    """Quantize `model` (weights folded, as the converter loads it) in place with
    settings.method. Returns (quantization config for config.json, calibration
    record for the model card)."""
    settings.check()
    mx.random.seed(settings.seed)
    tokens, described = calibration_tokens(tokenizer, settings)
    log(f"[calibration] {settings.method}: {tokens.shape[0]} samples x {tokens.shape[1]} tokens from {described}")
    mx.reset_peak_memory()
    started = time.perf_counter()
    quantization = {"group_size": group_size, "bits": bits, "mode": "affine"}
    fn = {"gptq": gptq_quantize, "awq": awq_quantize, "dwq": dwq_quantize, "dynamic": dynamic_quantize}[settings.method]
    result = fn(model, tokens, bits, group_size, scale_dtype, settings, log)
    if settings.method == "dynamic":
        quantization.update(result["per_layer"])
        quantization["bits"], quantization["group_size"] = result["low"]
    record = {
        "method": settings.method,
        "calibration_data": described,
        "calibration_samples": f"{tokens.shape[0]} x {tokens.shape[1]} tokens, seed {settings.seed}",
        "calibration_seconds": round(time.perf_counter() - started, 1),
        "calibration_peak_memory_gb": round(mx.get_peak_memory() / 1e9, 3),
        "process_peak_rss_gb": round(_peak_rss() / 1e9, 3),
    }
    if settings.method == "awq":
        record["awq_n_grid"] = settings.n_grid
    if settings.method == "dwq":
        record.update(dwq_learning_rate=settings.learning_rate, dwq_epochs=settings.epochs,
                      dwq_init=settings.dwq_init)  # fmt: skip
    if settings.method == "dynamic":
        record.update(dynamic_low=f"{result['low'][0]}-bit g{result['low'][1]}",
                      dynamic_high=f"{result['high'][0]}-bit g{result['high'][1]}",
                      dynamic_target_bpw=round(result["target_bpw"], 3))  # fmt: skip
    return quantization, record


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (NumPy's arrays included, which
    MLX's peak does not count)."""
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # macOS: bytes; Linux: KiB


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The calibration flags, shared by the converter and `python -m mlx_falcon_h1.quantize`."""
    d = CalibrationSettings()
    g = p.add_argument_group("calibrated quantization (with -q)")
    g.add_argument("--method", choices=METHODS, default=None,
                   help="Calibrated method: gptq, awq, dwq or dynamic (mixed bits at the same size).")
    g.add_argument("--calibration-data", "--data-path", default=None,
                   help="A .txt or mlx-lm .jsonl file, or a folder of them (default: the shipped "
                   "calibration text, Python source that is not the evaluation text).")
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="Calibration windows.")
    g.add_argument("--sequence-length", type=int, default=d.sequence_length, help="Tokens per window.")
    g.add_argument("--seed", type=int, default=d.seed, help="Picks the windows (and DWQ's order).")
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--n-grid", type=int, default=d.n_grid, help="AWQ: scale and clip ratios searched.")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="DWQ: Adam's step.")
    g.add_argument("--epochs", type=int, default=d.epochs, help="DWQ: passes over the samples.")
    g.add_argument("--dwq-init", choices=("plain", "gptq", "awq"), default=d.dwq_init,
                   help="DWQ: the quantization it starts from.")
    g.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="DWQ: recompute each layer in the backward pass (a 7B in 32 GB needs it).")
    g.add_argument("--target-bpw", type=float, default=None,
                   help="dynamic: bits per quantized weight (default: the plain setting's).")
    for name in ("low-bits", "low-group-size", "high-bits", "high-group-size"):
        g.add_argument(f"--{name}", type=int, default=None, help="dynamic: see quantize.py.")


def settings_from(kwargs: dict) -> Optional[CalibrationSettings]:
    """Pops the calibration flags out of `kwargs`; None when no --method is given."""
    names = [f for f in CalibrationSettings.__dataclass_fields__ if f != "method"]
    values = {n: kwargs.pop(n) for n in names if n in kwargs}
    method = kwargs.pop("method", None)
    if kwargs:
        raise TypeError(f"unknown calibration argument(s): {', '.join(sorted(kwargs))}")
    if method is None:
        return None
    s = CalibrationSettings(method=method, **{k: v for k, v in values.items() if v is not None})
    s.check()
    return s


def main(argv=None):
    """`python -m mlx_falcon_h1.quantize`: the converter with -q and a --method."""
    from mlx_falcon_h1_convert.convert import main as convert_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--method" not in argv and not any(a.startswith("--method=") for a in argv):
        raise SystemExit(f"python -m mlx_falcon_h1.quantize: error: --method is required ({', '.join(METHODS)})")
    convert_main(["-q", *argv] if not {"-q", "--quantize"} & set(argv) else argv)


if __name__ == "__main__":
    main()
