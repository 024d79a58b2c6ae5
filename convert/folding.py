"""What the source's weights become: the muP multipliers folded in, and each
weight's dtype (the model's `castable` rule: SSM parameters, conv and norms
stay float32)."""

from typing import Dict

import mlx.core as mx
from mlx.utils import tree_map_with_path

from mlx_falcon_h1.model import ModelArgs, castable


def fold_multipliers(weights: Dict[str, mx.array], args: ModelArgs) -> Dict[str, mx.array]:
    """Multiply every muP multiplier into the weights (falcon_h1_spec.md, "Folding").

    Computed in float32. q and v get attention_in; k gets attention_in * key
    (its bias only key); in_proj rows get ssm_in * mup (bias rows mup only).
    """
    mup = mx.concatenate(
        [
            mx.full((n,), m, dtype=mx.float32)
            for n, m in zip(
                [args.mamba_d_ssm, args.mamba_d_ssm]
                + [args.mamba_n_groups * args.mamba_d_state] * 2
                + [args.mamba_n_heads],
                args.ssm_multipliers,
            )
        ]
    )
    a_in, ssm_in = args.attention_in_multiplier, args.ssm_in_multiplier
    rules = {  # module path suffix: (weight factor, bias factor)
        "embed_tokens": (args.embedding_multiplier, None),
        "lm_head": (args.lm_head_multiplier, None),
        "self_attn.q_proj": (a_in, 1.0),
        "self_attn.k_proj": (a_in * args.key_multiplier, args.key_multiplier),
        "self_attn.v_proj": (a_in, 1.0),
        "self_attn.o_proj": (args.attention_out_multiplier,) * 2,
        "mamba.in_proj": (ssm_in * mup[:, None], mup),
        "mamba.out_proj": (args.ssm_out_multiplier,) * 2,
        "feed_forward.gate_proj": (args.mlp_multipliers[0],) * 2,
        "feed_forward.down_proj": (args.mlp_multipliers[1],) * 2,
    }
    folded = {}
    for name, w in weights.items():
        module, param = name.rsplit(".", 1)
        factors = next((f for s, f in rules.items() if module.endswith(s)), (None, None))
        factor = factors[0] if param == "weight" else factors[1]
        if factor is not None:
            w = w.astype(mx.float32) * factor  # cast to the output dtype later
        folded[name] = w
    return folded


def cast_weights(weights: Dict[str, mx.array], target: mx.Dtype, ssm_dtype: str) -> None:
    """In place: castable weights to `target`; SSM parameters, conv and norms to
    float32 (ssm_dtype "float32") or as they are (ssm_dtype "source")."""
    for name, w in weights.items():
        if not mx.issubdtype(w.dtype, mx.floating):
            continue
        if castable(name):
            weights[name] = w.astype(target)
        elif ssm_dtype == "float32":
            weights[name] = w.astype(mx.float32)


def cast_calibrated(model, target: mx.Dtype, before: Dict[str, mx.Dtype]) -> None:
    """After calibration (which computes in float32): the dtypes a plain
    conversion writes. Scales, biases and other castable weights in `target`;
    SSM parameters, conv and norms as they were before (`before`: path -> dtype)."""

    def cast(path, w):
        if not mx.issubdtype(w.dtype, mx.floating):
            return w
        return w.astype(target if castable(path) else before.get(path, mx.float32))

    model.update(tree_map_with_path(cast, model.parameters()))

