"""AWQ (Lin et al. 2023, arXiv:2306.00978): per-channel scales s moved from a
layer's input onto its weights (W x = (W diag(s)) (x / s)) so the channels with
large activations lose less to rounding, with 1/s folded exactly into the op
that makes x; then a per-group clip search (mlx-lm's).

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

import copy
import math
from dataclasses import dataclass
from typing import Callable, List, Sequence

import mlx.core as mx
import mlx.nn as nn

from .driver import capture_inputs, decoder, embed, linears, output_error, run_batched
from .layers import dequantized_form, fake_quantize, module_at, quantizable, restore_modules, to_float32


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
    p = module_at(root, prev)
    if isinstance(p, nn.Linear):  # output rows
        p.weight = (p.weight.astype(mx.float32) / prev_scales[:, None]).astype(p.weight.dtype)
        if "bias" in p:
            p.bias = (p.bias.astype(mx.float32) / prev_scales).astype(p.bias.dtype)
    elif "weight" in p and p.weight.shape == prev_scales.shape:  # RMSNorm, gated RMSNorm
        p.weight = (p.weight.astype(mx.float32) / prev_scales).astype(p.weight.dtype)
    else:
        raise TypeError(f"AWQ cannot fold a scale into {prev} ({type(p).__name__})")
    for name in layers:
        m = module_at(root, name)
        m.weight = (m.weight.astype(mx.float32) * scales).astype(m.weight.dtype)


def search_scale(consumers: List[nn.Module], x_mean: mx.array, error: Callable[[], float],
                 quantize: Callable, n_grid: int) -> mx.array:  # fmt: skip
    """The scale s = x_mean ** (r / n_grid), r = 0 .. n_grid - 1 (normalised to a
    geometric mean of 1 over its range), whose fake-quantized weights
    quantize(W s) / s in `consumers` give the least error() of the output they
    feed. The consumers' weights are left as they were."""
    weights = [m.weight for m in consumers]
    best, best_scales = math.inf, None
    for r in range(n_grid):
        s = mx.maximum(x_mean ** (r / n_grid), 1e-4)
        s = s / mx.sqrt(s.max() * s.min())
        for m, w in zip(consumers, weights):
            m.weight = quantize(w * s) / s
        err = error()
        if err < best:
            best, best_scales = err, s
    for m, w in zip(consumers, weights):
        m.weight = w
    return best_scales


def _mean_abs(x: mx.array) -> mx.array:
    return x.abs().reshape(-1, x.shape[-1]).mean(axis=0)


def awq_quantize(model, tokens, bits, group_size, scale_dtype, settings, log=print) -> None:
    """AWQ: scale search per group, clip search per linear, then quantize; layer by layer."""
    from mlx_lm.quant.awq import search_best_clip

    qf = lambda w: fake_quantize(w, bits, group_size)  # noqa: E731
    batch = settings.batch_size
    args = model.args
    x = run_batched(lambda t: embed(model, t), tokens, batch)
    subsample = max(1, x.shape[0] // 16)  # samples whose inputs are kept for the searches

    def concat(state, inp):
        return inp if state is None else mx.concatenate([state, inp], axis=0)

    for n, layer in enumerate(model.layers):
        originals = to_float32(layer)
        y = run_batched(decoder(layer), x, batch)  # float outputs: next layer's inputs
        paths = list(linears(layer, group_size))
        xs, ys = x[::subsample], y[::subsample]
        feats = capture_inputs(layer, paths, xs, batch, concat)

        plain = copy.deepcopy(layer)
        nn.quantize(plain, group_size, bits, class_predicate=lambda p, m: p in paths)
        dequantized_form(plain)
        loss_before = output_error(decoder(plain), xs, ys, batch)
        del plain
        float_params = layer.parameters()

        for g in awq_groups(args):
            if not all(p in paths for p in g.layers):
                continue
            block = lambda v, g=g: g.block(layer, v).astype(mx.float32)  # noqa: E731
            target = run_batched(block, xs, batch)
            x_mean = _mean_abs(feats[g.layers[0]])
            if g.repeat > 1:  # one scale per kv channel: the mean over the query heads it serves
                x_mean = x_mean.reshape(-1, g.repeat, g.head_dim).mean(axis=1, keepdims=True)
                x_mean = mx.repeat(x_mean, g.repeat, axis=1).reshape(-1)
            consumers = [module_at(layer, p) for p in g.layers]
            scales = search_scale(consumers, x_mean, lambda: output_error(block, xs, target, batch),
                                  qf, settings.n_grid)  # fmt: skip
            apply_scale(layer, g.prev, g.layers, scales, g.repeat, g.head_dim)
            for p in g.layers:
                feats[p] = feats[p] / scales

        for p in paths:
            if p.endswith(("q_proj", "k_proj")):  # as mlx-lm: scores are not an MSE target
                continue
            m = module_at(layer, p)
            m.input_feat = feats[p]
            m.weight = search_best_clip(m, qf, group_size, settings.n_grid)
            del m.input_feat
        nn.quantize(layer, group_size, bits, class_predicate=lambda p, m: p in paths)
        swapped = dequantized_form(layer)
        loss_after = output_error(decoder(layer), xs, ys, batch)
        restore_modules(layer, swapped)
        if loss_after > loss_before:  # as mlx-lm: never worse than plain on the calibration text
            model.layers[n] = layer = type(layer)(args)
            layer.update(float_params)
            to_float32(layer)
            nn.quantize(layer, group_size, bits, class_predicate=lambda p, m: p in paths)
            log(f"[awq] layer {n + 1}: no gain over plain ({loss_after:.3g} vs {loss_before:.3g}), kept plain")
        else:
            log(f"[awq] layer {n + 1}/{len(model.layers)}: output MSE {loss_before:.3g} -> {loss_after:.3g}")
        del originals, feats
        x = y
        mx.clear_cache()

    if not args.tie_word_embeddings and quantizable(model.lm_head, group_size):
        lm_head = model.lm_head
        to_float32(model.model.final_layernorm), to_float32(lm_head)
        h = run_batched(model.model.final_layernorm, x, batch)[::subsample]
        target = run_batched(lm_head, h, batch)
        scales = search_scale([lm_head], _mean_abs(h), lambda: output_error(lm_head, h, target, batch),
                              qf, settings.n_grid)  # fmt: skip
        apply_scale(model, "model.final_layernorm", ["lm_head"], scales)
        lm_head.input_feat = h / scales
        lm_head.weight = search_best_clip(lm_head, qf, group_size, settings.n_grid)
        del lm_head.input_feat
        model.lm_head = lm_head.to_quantized(group_size=group_size, bits=bits)
    embed_tokens = model.model.embed_tokens
    if quantizable(embed_tokens, group_size):  # no inputs to weigh by: plain
        model.model.embed_tokens = embed_tokens.to_quantized(group_size=group_size, bits=bits)
