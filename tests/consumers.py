"""The consumers of a converted folder, each as a function path -> model.

Stock mlx-lm (the installed release) runs for real. The others cannot run here;
each is a small model of its loading semantics, written from its source at the
commit named below: what it folds at load, what it applies at run time, which
config defaults it assumes and what it cannot express. Both ports share one
structure (mlx-swift-lm's FalconH1.swift says it ports mlx-lm's falcon_h1.py),
so the models reuse the installed mlx-lm's modules and change only what the
pinned source does differently.

- mlx-lm main, ml-explore/mlx-lm d78bf58 (2026-08-22), and LM Studio's
  mlx-engine, lmstudio-ai/mlx-engine 08f0c07 (2026-08-21), which pins mlx-lm
  2c008fd0 (its falcon_h1.py is byte-identical to d78bf58's) and mlx-vlm 321514d
  (whose text_only wrapper calls the mlx-lm model as is). Their falcon_h1.py
  differs from the 0.32.2 release in one line only: with cache=None,
  `[(None, None) * n]` is a list of ONE tuple, so only the first layer runs
  (generation always passes a cache; these models do too). Their load_config
  does not undo transformers' tagged floats (`{"__float__": "Infinity"}` stays a
  dict), so config.json is read with plain json here.
- mlx-swift-lm main, ml-explore/mlx-swift-lm 14414441 (2026-08-22;
  Libraries/MLXLLM/Models/FalconH1.swift last changed in 3de04ab3):
  * decoding: FalconH1Configuration.init(from:) reads the keys of SWIFT_CONFIG
    with those Swift types and defaults; a key that is absent or null takes the
    default, a value of another type fails the whole decode (rope_scaling is a
    `Float?`, the token ids `Int`). Other keys are ignored (time_step_limit,
    rope_parameters, our record).
  * load: drops lm_head tensors when tied; returns the weights untouched when
    the first safetensors file's metadata says `mlx_swift_lm.falcon_h1.scaling
    = attention_qkv_runtime_key_v1` or conv1d is in MLX layout (dim(-1) <=
    dim(1)); otherwise folds embedding, lm_head, attention_in (into q, k AND v),
    attention_out, ssm_out, mlp and ssm_in x mup into the WEIGHTS (never the
    biases) and transposes conv1d. Quantized layers: those with `.scales`, per
    layer as config.json's quantization says.
  * run time: keys = k_proj(x) * key_multiplier, always; tied head =
    embed.asLinear(h) * (lm_head_multiplier / embedding_multiplier); gated
    RMSNorm over all channels (groups ignored); time_step_limit (0, inf);
    rope_scaling f -> linear RoPE with scale 1/f.
"""

import json
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.models import falcon_h1 as mlx_lm_falcon_h1


class CannotLoad(Exception):
    """The consumer's loader refuses the folder."""


# key: (Swift type, default) from FalconH1Configuration.init(from:) at 14414441.
SWIFT_CONFIG = {
    "attention_bias": (bool, False),
    "attention_in_multiplier": (float, 1.0),
    "attention_out_multiplier": (float, 1.0),
    "bos_token_id": (int, 1),
    "embedding_multiplier": (float, 1.0),
    "eos_token_id": (int, 2),
    "head_dim": (int, 64),
    "hidden_act": (str, "silu"),
    "hidden_size": (int, 4096),
    "intermediate_size": (int, None),  # Int?; nil -> 4 * hidden_size in the MLP
    "key_multiplier": (float, 1.0),
    "lm_head_multiplier": (float, 1.0),
    "mamba_chunk_size": (int, 256),
    "mamba_conv_bias": (bool, True),
    "mamba_d_conv": (int, 4),
    "mamba_d_head": (int, 64),
    "mamba_d_ssm": (int, 1536),
    "mamba_d_state": (int, 256),
    "mamba_expand": (int, 2),
    "mamba_n_groups": (int, 1),
    "mamba_n_heads": (int, 128),
    "mamba_norm_before_gate": (bool, True),
    "mamba_proj_bias": (bool, False),
    "mamba_rms_norm": (bool, False),
    "max_position_embeddings": (int, 8192),
    "mlp_bias": (bool, False),
    "mlp_multipliers": (list, [1.0, 1.0]),
    "model_type": (str, "falcon_h1"),
    "num_attention_heads": (int, 32),
    "num_hidden_layers": (int, 32),
    "num_key_value_heads": (int, 8),
    "pad_token_id": (int, 0),
    "projectors_bias": (bool, False),
    "rms_norm_eps": (float, 1e-5),
    "rope_traditional": (bool, False),
    "rope_scaling": (float, None),  # Float?
    "rope_theta": (float, 100000.0),
    "ssm_in_multiplier": (float, 1.0),
    "ssm_multipliers": (list, [1.0] * 5),
    "ssm_out_multiplier": (float, 1.0),
    "tie_word_embeddings": (bool, False),
    "vocab_size": (int, 128000),
}
SWIFT_SCALING_METADATA = ("mlx_swift_lm.falcon_h1.scaling", "attention_qkv_runtime_key_v1")


def swift_decode(config: dict) -> dict:
    """config.json as FalconH1Configuration sees it; CannotLoad where Swift's decode throws."""
    out = {}
    for key, (kind, default) in SWIFT_CONFIG.items():
        value = config.get(key)
        if value is None:
            out[key] = default
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {
            bool: isinstance(value, bool),
            int: isinstance(value, int) and not isinstance(value, bool),
            float: number,
            str: isinstance(value, str),
            list: isinstance(value, list)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
        }[kind]
        if not ok:
            raise CannotLoad(f"mlx-swift-lm cannot decode {key} = {value!r} as {kind.__name__}")
        out[key] = float(value) if kind is float else value
    return out


def _weights_and_metadata(path: Path):
    weights, metadata = {}, None
    for file in sorted(path.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
        if metadata is None:
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                metadata = json.loads(f.read(n)).get("__metadata__", {})
    return weights, metadata or {}


def _quantize_like_mlx(model, quantization, weights):
    """Quantize the layers that have `.scales`, per layer as config.json says (both ports)."""
    if quantization is None:
        return

    def predicate(p, m):
        if not hasattr(m, "to_quantized") or f"{p}.scales" not in weights:
            return False
        return quantization.get(p, True)

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


class _WithCache(nn.Module):
    """Calls the model with a fresh cache, as generation does (see mlx-lm main above)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __call__(self, inputs):
        return self.model(inputs, cache=self.model.make_cache())


def step_model(model):
    """The mlx-lm model whose decode step a consumer runs (generation passes the
    cache to it, not through _WithCache)."""
    return model.model if isinstance(model, _WithCache) else model


def stock_mlx_lm(path: Path):
    """The installed mlx-lm release, for real."""
    return mlx_lm.utils.load_model(Path(path))[0]


def mlx_lm_main(path: Path):
    """mlx-lm main d78bf58 / mlx-engine 08f0c07 (mlx-lm 2c008fd0), as described above."""
    path = Path(path)
    config = json.loads((path / "config.json").read_text())  # no tagged-float decoding
    model = mlx_lm_falcon_h1.Model(mlx_lm_falcon_h1.ModelArgs.from_dict(config))
    weights, _ = _weights_and_metadata(path)
    weights = model.sanitize(weights)
    _quantize_like_mlx(model, config.get("quantization"), weights)
    model.load_weights(list(weights.items()), strict=True)
    return _WithCache(model)


class _KeysTimes(nn.Module):
    """`kProj(x) * keyMultiplier`: mlx-swift-lm scales the keys at run time."""

    def __init__(self, k_proj, key_multiplier: float):
        super().__init__()
        self.k_proj = k_proj
        self.key_multiplier = key_multiplier

    def __call__(self, x):
        return self.k_proj(x) * self.key_multiplier


def _swift_sanitize(weights, c, mup, metadata):
    if c["tie_word_embeddings"]:
        weights = {k: w for k, w in weights.items() if "lm_head" not in k.split(".")}
    if metadata.get(SWIFT_SCALING_METADATA[0]) == SWIFT_SCALING_METADATA[1]:
        return weights
    conv = weights["model.layers.0.mamba.conv1d.weight"]
    if conv.shape[-1] <= conv.shape[1]:
        return weights
    folds = [  # (name suffix, factor) in Swift's order; weights only
        ("embed_tokens.weight", c["embedding_multiplier"]),
        ("lm_head.weight", c["lm_head_multiplier"]),
        ("q_proj.weight", c["attention_in_multiplier"]),
        ("k_proj.weight", c["attention_in_multiplier"]),
        ("v_proj.weight", c["attention_in_multiplier"]),
        ("o_proj.weight", c["attention_out_multiplier"]),
        ("out_proj.weight", c["ssm_out_multiplier"]),
        ("gate_proj.weight", c["mlp_multipliers"][0]),
        ("down_proj.weight", c["mlp_multipliers"][1]),
        ("in_proj.weight", c["ssm_in_multiplier"] * mup[:, None]),
    ]
    out = {}
    for name, w in weights.items():
        factor = next((f for suffix, f in folds if name.endswith(suffix)), None)
        if factor is not None:
            w = w * factor
        elif "conv1d.weight" in name:
            w = w.transpose(0, 2, 1)
        out[name] = w
    return out


def mlx_swift_lm(path: Path):
    """mlx-swift-lm main 14414441's FalconH1Model, as described above."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    c = swift_decode(raw)
    args = mlx_lm_falcon_h1.ModelArgs.from_dict(
        {
            **c,
            "intermediate_size": c["intermediate_size"] or 4 * c["hidden_size"],
            "rope_scaling": None
            if c["rope_scaling"] is None
            else {"type": "linear", "factor": c["rope_scaling"]},
        }
    )
    model = mlx_lm_falcon_h1.Model(args)
    weights, metadata = _weights_and_metadata(path)
    weights = _swift_sanitize(weights, c, model.model._mup_vector, metadata)
    _quantize_like_mlx(model, raw.get("quantization"), weights)
    model.load_weights(list(weights.items()), strict=True)
    for layer in model.layers:
        layer.self_attn.k_proj = _KeysTimes(layer.self_attn.k_proj, c["key_multiplier"])
    return _WithCache(model)


def widened(model):
    """A consumer's model with its SSM parameters, conv and norms in float32, as
    our loader holds them: it then computes in float32 where ours does, so its
    logits show what the folder means to it apart from the activation dtype
    (a folder in the weights' dtype makes every consumer but ours compute in it)."""
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_falcon_h1.parameter_dtypes import with_float32_parameters

    model.update(tree_unflatten(list(with_float32_parameters(dict(tree_flatten(model.parameters()))).items())))
    return model


CONSUMERS = {
    "mlx-lm (installed)": stock_mlx_lm,
    "mlx-lm main d78bf58 / mlx-engine 08f0c07": mlx_lm_main,
    "mlx-swift-lm 14414441": mlx_swift_lm,
}
