"""What the source's weights become: the muP multipliers folded in, and each
weight's dtype (every one in the target dtype; with --ssm-dtype float32 the SSM
parameters, conv and norms, the model's non-`castable` ones, in float32)."""

from typing import Dict

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_falcon_h1.model import ModelArgs
from mlx_falcon_h1.parameter_dtypes import castable


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
    """In place: every floating weight to `target`; with ssm_dtype "float32" the
    SSM parameters, conv and norms to float32 (folder_format.SSM_DTYPES)."""
    for name, w in weights.items():
        if mx.issubdtype(w.dtype, mx.floating):
            weights[name] = w.astype(mx.float32 if ssm_dtype == "float32" and not castable(name) else target)


def cast_calibrated(model, target: mx.Dtype, ssm_dtype: str) -> None:
    """After calibration (which computes in float32): the dtypes a plain
    conversion writes, quantized scales and biases included."""
    params = dict(tree_flatten(model.parameters()))
    cast_weights(params, target, ssm_dtype)
    model.update(tree_unflatten(list(params.items())))


def float32_layout_traffic(weights: Dict[str, mx.array]) -> int:
    """Bytes a decode step moves more in an app that follows MLX's type promotion
    when the SSM parameters, conv and norms are float32 (folder_format.py), by
    arithmetic: each floating tensor a matmul reads (a weight, or a quantized
    layer's scales and biases; the embedding only as a tied head) is cast to
    float32 every step, reading it and writing 4 bytes an element that the
    matmul then reads instead of the stored ones: 8 bytes an element more."""
    tied = "lm_head.weight" not in weights
    return 8 * sum(
        w.size for k, w in weights.items()
        if castable(k) and mx.issubdtype(w.dtype, mx.floating) and (tied or "embed_tokens" not in k)
    )  # fmt: skip
