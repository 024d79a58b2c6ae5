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
FORMAT_VERSION = 2
LIST_MULTIPLIERS = {"mlp_multipliers": 2, "ssm_multipliers": 5}

# The consumers a converted folder is written for, and the versions read.
MLX_LM = "mlx-lm (0.32.x, main d78bf58, LM Studio's mlx-engine 08f0c07)"
MLX_SWIFT_LM = "mlx-swift-lm (main 14414441)"


def record(config: Dict[str, Any]) -> Dict[str, Any]:
    return config.get(FORMAT_KEY) or {}


def is_folded(config: Dict[str, Any]) -> bool:
    return bool(record(config).get("multipliers_folded"))


def needs_upgrade(config: Dict[str, Any]) -> bool:
    """A folded folder written before format 2: its config restates what the weights carry."""
    return is_folded(config) and record(config).get("format_version", 1) < FORMAT_VERSION


def original_multipliers(config: Dict[str, Any]) -> Dict[str, Any]:
    """The checkpoint's muP multipliers as trained (transformers' default 1.0 when absent)."""
    if is_folded(config) and not needs_upgrade(config):
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
    if not needs_upgrade(config):
        return {}
    return runtime_multipliers(original_multipliers(config), bool(config.get("tie_word_embeddings")))


def upgraded_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """A format-1 folder's config.json as format 2 writes it; the weights stay as they are."""
    assert needs_upgrade(config)
    return folded_config(config, original_multipliers(config))


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
