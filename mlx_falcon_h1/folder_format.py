"""The folder format mlx-falcon-h1-convert writes, and what each MLX consumer reads of it.

A converted folder has the muP multipliers multiplied into its weights and conv1d
in MLX layout. Its config.json is read by more than this package, so it must not
ask any reader to apply again what the weights already carry. What each one
reads (sources pinned in tests/consumers.py, which models each of them):

- mlx-lm's `falcon_h1` (PyPI 0.32.x; main at d78bf58; LM Studio's mlx-engine at
  08f0c07 pins mlx-lm 2c008fd0, whose falcon_h1.py is main's): folds every
  multiplier at load, but only when conv1d is in Hugging Face layout, so never
  for our folders. At run time it reads lm_head_multiplier / embedding_multiplier
  for the tied-embedding head, nothing else.
- mlx-swift-lm's `FalconH1` (main at 14414441): folds at load under the same
  layout test (or never, when its own safetensors metadata says so). At run time
  it multiplies the keys by key_multiplier, always, and reads lm_head_multiplier
  / embedding_multiplier for the tied head.
- ours: applies every multiplier the config states, at run time.

Format 1 kept the original values in config.json (the weights carried them too),
so mlx-swift-lm applied key_multiplier twice. Format 2 writes what is left to
apply: 1.0 for every multiplier the weights carry and, for tied embeddings,
lm_head_multiplier = lm_head / embedding (the shared matrix carries the
embedding multiplier; the head needs the rest). Every reader then computes the
reference, whichever of these fields it reads at run time or folds at load. The
original values stay in the record under "mlx_falcon_h1".

Format 2 kept A_log, D, dt_bias, conv1d and the norms in float32. Every consumer
but ours follows MLX's type promotion: a bfloat16 activation meeting a float32
norm weight (or SSM path) comes out float32, the residual stream turns float32,
and every matmul then casts its weights (or quantized scales and biases) to
float32 at every token. Format 3 stores them in the dtype of the folder's other
weights, as mlx-lm's converter does (layout "weights"), unless the user chose
"float32" (--ssm-dtype float32; the record says whether the layout was chosen,
so a later default never overrides a choice). Our loader widens them to float32
either way (parameter_dtypes.with_float32_parameters).
"""

import math
from typing import Any, Dict, List

# The scalar muP multipliers (config.json keys; mlp_multipliers and
# ssm_multipliers are lists, LIST_MULTIPLIERS: their lengths).
MULTIPLIERS = (
    "embedding_multiplier",
    "lm_head_multiplier",
    "key_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
)

# Key of our record in config.json: what the converter did to the weights.
FORMAT_KEY = "mlx_falcon_h1"
FORMAT_VERSION = 3
LIST_MULTIPLIERS = {"mlp_multipliers": 2, "ssm_multipliers": 5}

# The consumers a converted folder is written for, and the versions read.
MLX_LM = "mlx-lm (0.32.x, main d78bf58, LM Studio's mlx-engine 08f0c07)"
MLX_SWIFT_LM = "mlx-swift-lm (main 14414441)"

# Layouts of the SSM parameters, conv and norms (--ssm-dtype; the record's
# "ssm_dtype"): in the weights' dtype, the default, or float32.
SSM_DTYPES = ("weights", "float32")

# What the float32 layout costs and buys in stock mlx-lm 0.32.2, measured by
# examples/consumer_layouts_table.py (examples/consumer_layouts_table.json): per
# decode layer of the 0.5B shape, by the weights' quantization, (kernel launches
# with float32 parameters, launches with them in the weights' dtype, weight
# casts per token with float32 parameters), counted as a Mac runs the step
# (launch_count.py); the 7B's are 37/28/9 and 46/28/18.
FLOAT32_LAYOUT_LAUNCHES = {"bf16": (36, 27, 9), "4-bit": (45, 27, 18), "8-bit": (45, 27, 18)}
# Mean KL against transformers of the trained fixture's 8-bit folder in stock
# mlx-lm (1,024 held-out tokens, on this project's CPU machine): (float32
# parameters, the weights' dtype).
FLOAT32_LAYOUT_KL = (0.000101, 0.00256)
FLOAT32_LAYOUT_SOURCE = "stock mlx-lm 0.32.2, examples/consumer_layouts_table.json"


def record(config: Dict[str, Any]) -> Dict[str, Any]:
    return config.get(FORMAT_KEY) or {}


def is_folded(config: Dict[str, Any]) -> bool:
    return bool(record(config).get("multipliers_folded"))


def format_version(config: Dict[str, Any]) -> int:
    return record(config).get("format_version", 1)


def restates_multipliers(config: Dict[str, Any]) -> bool:
    """A folded folder written before format 2: its config restates what the weights carry."""
    return is_folded(config) and format_version(config) < 2


def needs_upgrade(config: Dict[str, Any]) -> bool:
    """A folded folder written before the current format (what --upgrade changes)."""
    return is_folded(config) and format_version(config) < FORMAT_VERSION


def float32_layout_cost() -> str:
    """What --ssm-dtype float32 costs and buys in other apps, in a sentence."""
    per = "; ".join(f"{w}: {a} kernel launches instead of {b}, {c} weight casts"
                    for w, (a, b, c) in FLOAT32_LAYOUT_LAUNCHES.items())  # fmt: skip
    return (f"in stock mlx-lm each decode layer then casts weights to float32 at every token ({per}), "
            f"for a mean KL of {FLOAT32_LAYOUT_KL[0]:g} instead of {FLOAT32_LAYOUT_KL[1]:g} "
            f"(the trained fixture's 8-bit folder; {FLOAT32_LAYOUT_SOURCE})")  # fmt: skip


def original_multipliers(config: Dict[str, Any]) -> Dict[str, Any]:
    """The checkpoint's muP multipliers as trained (transformers' default 1.0 when absent)."""
    if is_folded(config) and not restates_multipliers(config):
        return dict(record(config)["multipliers"])
    originals = {name: float(config.get(name, 1.0)) for name in MULTIPLIERS}
    for name, n in LIST_MULTIPLIERS.items():
        originals[name] = [float(m) for m in config.get(name) or [1.0] * n]
    return originals


def runtime_multipliers(originals: Dict[str, Any], tie_word_embeddings: bool) -> Dict[str, Any]:
    """The config.json values of a folder whose weights carry `originals`."""
    values = {name: 1.0 for name in MULTIPLIERS}
    values.update({name: [1.0] * n for name, n in LIST_MULTIPLIERS.items()})
    if tie_word_embeddings:
        values["lm_head_multiplier"] = (
            originals["lm_head_multiplier"] / originals["embedding_multiplier"]
        )
    return values


def folded_config(config: Dict[str, Any], originals: Dict[str, Any], **record_fields) -> Dict:
    """`config` rewritten for weights that carry `originals`, with our record."""
    config = dict(config)
    config.update(runtime_multipliers(originals, bool(config.get("tie_word_embeddings"))))
    config[FORMAT_KEY] = {
        **record(config),
        **record_fields,
        "format_version": FORMAT_VERSION,
        "multipliers_folded": True,
        "multipliers": originals,
    }
    return config


def runtime_overrides(config: Dict[str, Any]) -> Dict[str, Any]:
    """The multipliers to run a folder with, where they differ from its config.json:
    for a format-1 folder (its config restates what its weights carry) what is left
    to apply, as format 2 writes it; nothing for any other folder. ModelArgs applies
    this, so a format-1 folder runs right wherever it is loaded."""
    if not restates_multipliers(config):
        return {}
    return runtime_multipliers(original_multipliers(config), bool(config.get("tie_word_embeddings")))


def upgraded_config(config: Dict[str, Any], **record_fields) -> Dict[str, Any]:
    """An older folder's config.json as the current format writes it (the
    multipliers as left to apply), with `record_fields` in its record."""
    assert is_folded(config)
    return folded_config(config, original_multipliers(config), **record_fields)


def consumer_caveats(args, config: Dict[str, Any]) -> Dict[str, List[str]]:
    """What each other consumer cannot express of this configuration (args: its ModelArgs).

    Both ports normalise the gated RMSNorm over all channels and hard-code
    time_step_limit to (0, inf). mlx-swift-lm decodes config.json into fixed
    Swift types: rope_scaling must be a number (a linear factor) or null, and the
    token ids single integers; anything else fails to decode and the folder does
    not load there.
    """
    common = []
    if args.mamba_rms_norm and args.mamba_n_groups > 1:
        common.append("its gated RMSNorm normalises over all channels, not per group")
    if tuple(args.time_step_limit) != (0.0, math.inf):
        common.append("it ignores time_step_limit")
    swift = list(common)
    if config.get("rope_scaling") is not None:
        swift.append("it cannot decode a rope_scaling object (it reads a number), so it cannot load the folder")
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if isinstance(config.get(key), list):
            swift.append(f"it cannot decode a list as {key}, so it cannot load the folder")
    return {consumer: reasons for consumer, reasons in ((MLX_LM, common), (MLX_SWIFT_LM, swift)) if reasons}
