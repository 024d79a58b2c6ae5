"""Dynamic mixed precision (mlx-lm's dynamic_quant): estimate each layer's
sensitivity (the first-order change of KL(float || quantized) when the layer
goes from high to low bits) and give the most sensitive layers more bits,
within the size of the plain setting.
"""

from typing import Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .driver import teacher_logits
from .layers import fake_quantize, quantizable, to_float32

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


def bpw(bits: int, group_size: int) -> float:
    """Bits per quantized weight: a bfloat16 scale and bias per group."""
    return bits + 32 / group_size


def dynamic_settings(bits: int, group_size: int, settings):
    """((low bits, group size), (high bits, group size), target bits per weight)
    that dynamic_quantize uses for --q-bits `bits` at --q-group-size `group_size`
    (its docstring gives the defaults). Arithmetic only, as is check_target_bpw:
    the converter calls both to refuse a bad combination before reading weights."""
    low = (settings.low_bits or bits, settings.low_group_size or min(2 * group_size, 128))
    high = (settings.high_bits or bits + 1, settings.high_group_size or group_size)
    return low, high, settings.target_bpw or bpw(bits, group_size)


def check_target_bpw(low, high, target: float) -> None:
    """The target must lie between the low and the high setting's bits per weight."""
    if not bpw(*low) <= target <= bpw(*high):
        raise ValueError(
            f"--target-bpw {target:g} is outside [{bpw(*low):g}, {bpw(*high):g}], the bits per "
            f"weight of the low ({low[0]}-bit g{low[1]}) and high ({high[0]}-bit g{high[1]}) settings"
        )


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
    low, high, target = dynamic_settings(bits, group_size, settings)
    check_target_bpw(low, high, target)
    leaves = tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module)
    plain = {p: m for p, m in leaves if quantizable(m, group_size)}
    mixed = {p: m for p, m in leaves if quantizable(m, low[1]) and quantizable(m, high[1])}
    sens = {}
    if mixed:  # (none when no layer's width divides both group sizes: all stay plain)
        originals = {p: m.weight for p, m in mixed.items()}
        to_float32(model)
        sens = sensitivities(model, tokens, mixed, low, high, settings)
        for p, m in mixed.items():
            m.weight = originals[p]
    else:
        log(f"[dynamic] no layer takes both g{low[1]} and g{high[1]}: every layer at {bits}-bit g{group_size}")
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
