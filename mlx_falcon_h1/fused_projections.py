"""Fused projections for generation: 4 matmuls per layer instead of 9.

A layer's q, k, v and the mixer's in_proj read the same normed input, and so
do the MLP's gate and up: each set is one matmul of the weights concatenated
along their output rows, split after. o_proj and out_proj add into the same
residual, h + o(a) + out(m) = h + [o | out] [a; m]: one matmul of the weights
concatenated along their input columns. A decode step is bound by launches (a
Mac's GPU) or by per-call overhead (the CPU), not by the arithmetic, which is
the same.

Built after loading, from the on-disk layout, which nothing else sees change:
the checkpoint, the converter, LoRA, sharding and saving work on the plain
q/k/v/in_proj/o/out/gate/up layout, and `unfuse_projections` gives it back
(exactly: the arrays are split at the same places, no arithmetic). The fused
arrays replace the separate ones; the separate modules are kept without their
arrays, to be refilled by unfuse.

The muP multipliers stay where the reference applies them, up to float
rounding: the input multipliers (attention_in, ssm_in) and the ones after the
projection (key, ssm_multipliers) become one per-column scale of the fused
output, the output multipliers (attention_out, ssm_out) scale [a; m] before
the matmul. Folded checkpoints (our converter's) have them all 1.0: no scale.

A set fuses only where its matrices are alike: all float of one dtype, or all
quantized with the same mode, bits and group size (packed rows, scales and
biases then concatenate exactly; along the input, every part is a whole number
of groups). A per-layer recipe that mixes widths falls back per set (q/k/v
still fuse when in_proj differs); LoRA and sharded layers are never fused.
"""

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .linear import linear

ARRAYS = ("weight", "scales", "biases")  # a (quantized) Linear's matrix arrays; "bias" apart


def _signature(module) -> Optional[tuple]:
    """What must match for modules to fuse; None for one that never fuses (LoRA, sharded)."""
    if type(module) is nn.Linear:
        return ("float", module.weight.dtype)
    if type(module) is nn.QuantizedLinear:
        biases = module.get("biases")
        return ("quantized", module.mode, module.bits, module.group_size, module.weight.dtype,
                module.scales.dtype, None if biases is None else biases.dtype)  # fmt: skip
    return None


def _input_dims(module) -> int:
    w = module.weight
    return w.shape[1] if type(module) is nn.Linear else w.shape[1] * 32 // module.bits


def _fusable(modules: Sequence[nn.Module], along_input: bool = False) -> bool:
    signatures = {_signature(m) for m in modules}
    if None in signatures or len(signatures) != 1:
        return False
    if not along_input:
        return len({_input_dims(m) for m in modules}) == 1
    outputs = {m.weight.shape[0] for m in modules}
    # Along the input, each part must be whole groups (and whole packed words).
    whole = all(
        type(m) is nn.Linear
        or (_input_dims(m) % m.group_size == 0 and _input_dims(m) * m.bits % 32 == 0)
        for m in modules
    )
    return len(outputs) == 1 and whole


class FusedLinear(nn.Module):
    """Several Linear (or QuantizedLinear) layers as one: `proj` holds their
    matrices concatenated along the output rows (axis 0) or the input columns
    (axis 1).

    Rows: y = (proj(x) * pre + bias * post), pre and post per output column
    (None: all 1, and the bias stays inside proj). Columns: y = proj(x) +
    sum_i bias_scales[i] * bias[i], x the members' inputs side by side.
    `offsets`: where the consumer splits the output (rows).
    """

    def __init__(self, proj: nn.Module, members, axis: int, sizes: List[int], had_bias: List[bool]):
        super().__init__()
        self.proj = proj
        # Not parameters (object attributes): the stripped members, for unfuse.
        for name, value in dict(members=members, axis=axis, sizes=sizes, had_bias=had_bias,
                                pre=None, post=None, bias_scales=None, offsets=None).items():  # fmt: skip
            object.__setattr__(self, "_" + name, value)

    @property
    def offsets(self) -> List[int]:
        return self._offsets

    def __call__(self, x: mx.array) -> mx.array:
        y = linear(self.proj, x)
        if self._pre is not None:
            y = y * self._pre.astype(y.dtype)
        if "bias" not in self:
            return y
        if self._axis == 0:
            return y + (self.bias if self._post is None else self.bias * self._post.astype(self.bias.dtype))
        # Columns: one bias per member with one, each times its member's output multiplier.
        bias = self.bias[0] * self._bias_scales[0]
        for b, s in zip(self.bias[1:], self._bias_scales[1:]):
            bias = bias + b * s
        return y + bias

    def restore(self) -> None:
        """Give each member its part of the arrays back, and put it back in its place."""
        proj, axis, sizes = self.proj, self._axis, self._sizes
        total = sum(sizes)
        parts = {}
        for key in ARRAYS:
            if proj.get(key) is None:
                continue
            a = proj[key]
            # Along the input, each array's width is proportional to the input size
            # (float: 1 column each; packed words, scales, biases: per 32/bits, per group).
            width = a.shape[axis]
            cuts = np.cumsum([s * width // total for s in sizes])[:-1].tolist()
            parts[key] = mx.split(a, cuts, axis=axis)
            if axis == 1:  # column blocks are strided views: matmuls would copy them at each call
                parts[key] = [mx.contiguous(part) for part in parts[key]]
        bias = self.get("bias", proj.get("bias"))
        if bias is not None:
            if axis == 0:
                bias = mx.split(bias, np.cumsum(sizes)[:-1].tolist())
            else:
                bias = iter(list(bias))
        # Frozen as the fused arrays are (a model frozen for LoRA stays frozen).
        frozen = {k for k in parts if k in proj._no_grad}
        if "bias" in self._no_grad or "bias" in proj._no_grad:
            frozen.add("bias")
        for i, ((owner, name, member), had_bias) in enumerate(zip(self._members, self._had_bias)):
            for key, split in parts.items():
                member[key] = split[i]
            if had_bias:
                member["bias"] = bias[i] if axis == 0 else next(bias)
            member._no_grad = {k for k in frozen if k in member}
            setattr(owner, name, member)


def _fuse(members: List[Tuple[nn.Module, str]], axis: int, pre=None, post=None, bias_scales=None) -> FusedLinear:
    """One FusedLinear for the (owner, attribute) Linear layers `members`, which it
    takes out of their owners (their arrays moved into the fused ones)."""
    modules = [getattr(owner, name) for owner, name in members]
    sizes = [m.weight.shape[0] for m in modules] if axis == 0 else [_input_dims(m) for m in modules]
    proj = copy.copy(modules[0])  # the same class and quantization settings, arrays replaced
    proj._no_grad = set(modules[0]._no_grad)  # its own (a shallow copy shares the set)
    for key in ARRAYS + ("bias",):
        proj.pop(key, None)
    for key in ARRAYS:
        if modules[0].get(key) is not None:
            proj[key] = mx.concatenate([m[key] for m in modules], axis=axis)
    had_bias = ["bias" in m for m in modules]
    biased = [m["bias"] for m in modules if "bias" in m]
    fused = FusedLinear(proj, [(o, n, m) for (o, n), m in zip(members, modules)], axis, sizes, had_bias)
    if biased:
        if axis == 0:  # a member without a bias adds zeros in its rows
            zeros = lambda n: mx.zeros((n,), biased[0].dtype)  # noqa: E731
            bias = mx.concatenate([m["bias"] if "bias" in m else zeros(s) for m, s in zip(modules, sizes)])
            if pre is None and post is None:
                proj["bias"] = bias
            else:
                fused.bias = bias
                if "bias" in modules[0]._no_grad:
                    fused.freeze(keys=["bias"], recurse=False)
        else:
            fused.bias = mx.stack(biased)
            if "bias" in modules[0]._no_grad:
                fused.freeze(keys=["bias"], recurse=False)
            object.__setattr__(fused, "_bias_scales", [s for s, b in zip(bias_scales, had_bias) if b])
    object.__setattr__(fused, "_pre", pre)
    object.__setattr__(fused, "_post", post)
    for m in modules:  # the members keep no arrays: the fused ones replace them
        for key in ARRAYS + ("bias",):
            m.pop(key, None)
    for owner, name in members:
        delattr(owner, name)
    return fused


def _column_scale(parts: Sequence[Tuple[int, object]]) -> Optional[mx.array]:
    """(size, multiplier: a float or a vector of `size`) per part, as one float32
    vector; None when every entry is 1 (folded multipliers)."""
    scale = np.concatenate([np.broadcast_to(np.asarray(m, np.float64), (n,)) for n, m in parts])
    return None if np.all(scale == 1.0) else mx.array(scale.astype(np.float32))


def _fuse_layer(layer) -> None:
    attn, mixer, mlp = layer.self_attn, layer.mamba, layer.feed_forward
    if "fused_in" not in layer:
        qkv = [(attn, "q_proj"), (attn, "k_proj"), (attn, "v_proj")]
        whole = qkv + [(mixer, "in_proj")]
        members = whole if _fusable([getattr(o, n) for o, n in whole]) else qkv
        if _fusable([getattr(o, n) for o, n in members]):
            nq, nk, nv = (getattr(attn, n).weight.shape[0] for _, n in qkv)
            s_a, key = layer.attention_in_multiplier, attn.key_multiplier
            pre, post = [(nq, s_a), (nk, s_a * key), (nv, s_a)], [(nq, 1.0), (nk, key), (nv, 1.0)]
            if members is whole:
                n_in = mixer.in_proj.weight.shape[0]
                mup = 1.0 if mixer._mup is None else np.array(mixer._mup, np.float64)
                pre.append((n_in, mixer.ssm_in_multiplier * mup))
                post.append((n_in, mup))
            layer.fused_in = _fuse(members, 0, _column_scale(pre), _column_scale(post))
            offsets = [nq + nk, nq + nk + nv] if members is whole else [nq + nk]  # qk | v | zxbcdt
            object.__setattr__(layer.fused_in, "_offsets", offsets)
    if "gate_up" not in mlp:
        members = [(mlp, "gate_proj"), (mlp, "up_proj")]
        if _fusable([getattr(o, n) for o, n in members]):
            mlp.gate_up = _fuse(members, 0)
    if "fused_out" not in layer:
        members = [(attn, "o_proj"), (mixer, "out_proj")]
        if _fusable([getattr(o, n) for o, n in members], along_input=True):
            scales = [layer.attention_out_multiplier, layer.ssm_out_multiplier]
            layer.fused_out = _fuse(members, 1, bias_scales=scales)


def fuse_projections(model, evaluate: bool = True) -> Dict[str, int]:
    """Fuse every layer's projections in place (see the module docstring); returns
    fusion_summary(model). evaluate: compute each layer's fused arrays at once,
    so the separate ones are freed layer by layer (else at first use)."""
    for layer in model.layers:
        _fuse_layer(layer)
        if evaluate:
            mx.eval(layer.parameters())
    model.__dict__.pop("_compiled_decode", None)  # traced over the old layout (decode.py)
    return fusion_summary(model)


def unfuse_projections(model):
    """The plain layout back (q/k/v/in_proj/o/out/gate/up), exactly; returns model.
    For what needs it: training, LoRA, sharding, saving."""
    for layer in model.layers:
        for owner, name in ((layer, "fused_in"), (layer.feed_forward, "gate_up"), (layer, "fused_out")):
            if name in owner:
                owner[name].restore()
                delattr(owner, name)
    model.__dict__.pop("_compiled_decode", None)
    return model


def fusion_summary(model) -> Dict[str, int]:
    """How the layers' projection sets fused: "sets" (3 per layer: q/k/v/in_proj,
    gate/up, o/out), "fused" (whole), "qkv_only" (q/k/v fused, in_proj apart),
    "unfused", and "matmuls" over all layers (9 per plain layer, 4 fused)."""
    layers = model.layers
    summary = {"sets": 3 * len(layers), "fused": 0, "qkv_only": 0, "unfused": 0, "matmuls": 0}
    for layer in layers:
        if "fused_in" not in layer:
            kind, matmuls = "unfused", 4
        elif len(layer.fused_in._sizes) == 4:
            kind, matmuls = "fused", 1
        else:
            kind, matmuls = "qkv_only", 2
        summary[kind] += 1
        for fused, whole in (("gate_up" in layer.feed_forward, 3), ("fused_out" in layer, 2)):
            summary["fused" if fused else "unfused"] += 1
            matmuls += whole - 1 if fused else whole
        summary["matmuls"] += matmuls
    return summary


def fused_layer(layer, n: mx.array, mask, cache) -> mx.array:
    """What model.DecoderLayer adds to the residual before its MLP, with fused
    projections, from its normed input n: fused_in is [q | k | v] or [q | k | v |
    in_proj] of n, multipliers included; fused_out is [o_proj | out_proj] over [a *
    attention_out ; m * ssm_out] (its bias scaled alike), which the mixer writes
    (Mixer.mix's prefix: the decode step's kernel writes it whole). Takes the layer
    rather than importing the model, which imports this module."""
    attn, mixer = layer.self_attn, layer.mamba
    if "fused_in" in layer:
        qk, v, *zxbcdt = mx.split(layer.fused_in(n), layer.fused_in.offsets, axis=-1)
        zxbcdt = zxbcdt[0] if zxbcdt else mixer.project(n)
    else:
        qk, v = attn.project(_times(n, layer.attention_in_multiplier))
        zxbcdt = mixer.project(n)
    a = attn.attend(qk, v, mask, cache)
    if "fused_out" in layer:
        return layer.fused_out(mixer.mix(zxbcdt, cache, n.dtype, prefix=a,
                                         prefix_scale=layer.attention_out_multiplier,
                                         out_scale=layer.ssm_out_multiplier))
    m = _times(linear(mixer.out_proj, mixer.mix(zxbcdt, cache, n.dtype)), layer.ssm_out_multiplier)
    return m + _times(linear(attn.o_proj, a), layer.attention_out_multiplier)


def _times(x: mx.array, multiplier: float) -> mx.array:
    return x if multiplier == 1.0 else x * multiplier
