"""Falcon-H1 MLX folders made by other tools: which tool, and what their weights carry.

Every Falcon-H1 MLX folder published so far (mlx-community's, LM Studio's search
lists them) was made by one of two tools; read from ml-explore/mlx-lm's history
(`git log -p mlx_lm/models/falcon_h1.py`, 1a4d24ed .. e08ec15b):

- "mlx-lm": `mlx_lm.convert`, every release since 0.28.1 (the first with
  falcon_h1). Its sanitize runs while conv1d is in Hugging Face layout, in the
  checkpoint's dtype, and multiplies the WEIGHTS (never a bias): embed x emb,
  lm_head x lm, q_proj and k_proj x attention_in, o_proj x attention_out,
  in_proj rows x ssm_in * ssm_multipliers[i], out_proj x ssm_out, gate_proj x
  mlp[0], down_proj x mlp[1]. Never applied: key_multiplier (its `key_proj`
  branch matches no tensor) and attention_in on v_proj. Each factor is the
  multiplier rounded to that dtype (MLX casts a Python scalar to the array's
  dtype); in_proj's is round(round(ssm_in) * round(mup_i)). config.json keeps
  every original multiplier. 0.28.1, 0.30.4 and 0.32.2 write bit-identical
  folders (tests/fixtures/published/: their tensor hashes).
- "unfolded": the falcon_h1 branch of mlx-lm PR #231 (June-July 2025, installed
  from git): conv1d transposed, nothing folded; every multiplier must be
  applied at run time. Its mlx-lm predates 0.27.0, so a quantized folder's
  `quantization` entry has no "mode" key, which every release since writes.

What decides between them, strongest first: the `quantization` entry ("mode"
present: a release; absent: the branch); the model card's "using mlx-lm version
X" line (written only by --upload-repo); and, for a folder with neither (bf16),
the folder's own tokenizer on a fixed text: a trained model predicts text under
the right reading and not under the wrong one (measured on the trained fixture's
bf16 folders: 2.6 nats per token right, 8.0 (folded read as unfolded) and 95
(unfolded read as folded) wrong; a random model tells nothing and is refused). Contradictory or weak evidence is refused, naming
`source_format` (the loader's model_config, MLX_FALCON_H1_SOURCE_FORMAT for the
commands, `--source-format` for the converter's --upgrade).
"""

import json
import os
import re
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import numpy as np

from .config import ModelArgs
from .folder_format import FORMAT_KEY, MULTIPLIERS
from .model import Model

SOURCE_FORMATS = ("mlx-lm", "unfolded")
SOURCE_FORMAT_KEY = "source_format"  # in the loader's model_config
SOURCE_FORMAT_ENV = "MLX_FALCON_H1_SOURCE_FORMAT"
CONV = "model.layers.0.mamba.conv1d.weight"
# mlx-swift-lm marks the folders it converts (FalconH1.swift at 14414441).
SWIFT_METADATA = "mlx_swift_lm.falcon_h1.scaling"
# The first mlx-lm release with falcon_h1 (earlier versions ran the PR branch).
FIRST_RELEASE = (0, 28, 1)

# Tensor name suffix -> the factor transformers applies to it (falcon_h1_spec.md).
# "in_proj" is per output row (its five segments); the head is handled apart
# because a tied head is the embedding matrix.
ATTENTION_MLP = {
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "mamba.in_proj": "in",
    "mamba.out_proj": "out",
    "feed_forward.gate_proj": "gate",
    "feed_forward.down_proj": "down",
}
TEXT = '''import os


def read_lines(path):
    """Return the lines of a text file, without their line endings."""
    with open(path) as f:
        return [line.rstrip("\\n") for line in f]


class Counter:
    def __init__(self):
        self.counts = {}

    def add(self, key):
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key]
'''
# A reading is decided by text when it beats the other by this many nats per token.
TEXT_MARGIN = 1.0


class SourceFormatError(ValueError):
    """A folder made by another tool whose kind the evidence does not settle."""


@dataclass
class Finding:
    kind: Optional[str]  # one of SOURCE_FORMATS, or None (undecided)
    sure: str  # "told", "certain", "likely", "weak" or "contradictory"
    evidence: List[str] = field(default_factory=list)
    fold_dtype: str = "bfloat16"  # the dtype mlx-lm's fold ran in

    def line(self, path) -> str:
        what = {
            "mlx-lm": f"made by mlx-lm's converter (muP multipliers folded in {self.fold_dtype}, "
            "key_multiplier and v_proj's attention_in never applied)",
            "unfolded": "made by mlx-lm's pre-release falcon_h1 branch (no multiplier folded)",
            None: "converted by another tool, which one is undecided",
        }[self.kind]
        return f"{path}: {what}; {self.sure}: {'; '.join(self.evidence)}"


def is_foreign(config: Dict[str, Any], conv_shape) -> bool:
    """Converted by another tool: conv1d in MLX layout (C, K, 1), no record of
    ours, some muP multiplier != 1 (with all at 1 there is nothing to get wrong)."""
    if FORMAT_KEY in config or conv_shape is None or len(conv_shape) != 3:
        return False
    if conv_shape[-1] != 1 or conv_shape[1] == 1:  # HF layout, or K = 1 (no telling)
        return False
    values = [float(config.get(m, 1.0)) for m in MULTIPLIERS]
    values += [float(m) for m in (config.get("mlp_multipliers") or []) + (config.get("ssm_multipliers") or [])]
    return any(v != 1.0 for v in values)


def safetensors_metadata(file: Path) -> Dict[str, str]:
    """A safetensors file's `__metadata__` (the loader has checked the file by now)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__") or {}


def _swift_scaled(path: Path) -> bool:
    files = sorted(path.glob("*.safetensors"))
    return bool(files) and SWIFT_METADATA in safetensors_metadata(files[0])


def _card_version(path: Path) -> Optional[Tuple[int, ...]]:
    card = path / "README.md"
    if not card.is_file():
        return None
    found = re.search(r"using mlx-lm version \**\s*([0-9]+(?:\.[0-9]+)+)", card.read_text(errors="replace"))
    return tuple(int(x) for x in found.group(1).split(".")) if found else None


def _fold_dtype(config: Dict[str, Any], weights: Dict[str, mx.array]) -> str:
    # mlx-lm folds in the dtype the checkpoint's tensors were loaded in, which
    # transformers records as torch_dtype (or dtype, transformers 5); its
    # converter also casts the norms to it, so they tell when config does not.
    stated = config.get("torch_dtype") or config.get("dtype")
    if stated in ("float32", "float16", "bfloat16"):
        return stated
    norm = weights.get("model.final_layernorm.weight")
    return str(norm.dtype).removeprefix("mlx.core.") if norm is not None else "bfloat16"


def recognise(
    path: Path,
    config: Dict[str, Any],
    weights: Dict[str, mx.array],
    told: Optional[str] = None,
) -> Finding:
    """Which tool made `path`, from everything it says; see the module docstring."""
    fold_dtype = _fold_dtype(config, weights)
    if told is not None:
        if told not in SOURCE_FORMATS:
            raise SourceFormatError(f"source_format {told!r}: choose one of {', '.join(SOURCE_FORMATS)}")
        return Finding(told, "told", ["source_format given"], fold_dtype)

    if _swift_scaled(path):
        # Folded by mlx-swift-lm (q, k AND v; the key at run time): neither
        # kind, and what its fold rounded has not been read. Refused.
        return Finding(None, "contradictory", [f"safetensors metadata {SWIFT_METADATA}: "
                                               "an mlx-swift-lm conversion, not supported"], fold_dtype)  # fmt: skip
    votes = []  # (kind, evidence)
    quantization = config.get("quantization")
    if isinstance(quantization, dict):
        if "mode" in quantization:
            votes.append(("mlx-lm", "quantization entry has 'mode' (mlx-lm >= 0.27; falcon_h1 releases fold)"))
        else:
            votes.append(("unfolded", "quantization entry lacks 'mode' (mlx-lm < 0.27: the pre-release branch)"))
    version = _card_version(path)
    if version is not None:
        v = ".".join(map(str, version))
        if version >= FIRST_RELEASE:
            votes.append(("mlx-lm", f"model card names mlx-lm {v} (a release with falcon_h1)"))
        else:
            votes.append(("unfolded", f"model card names mlx-lm {v} (before falcon_h1's release)"))
    kinds = {k for k, _ in votes}
    if len(kinds) > 1:
        return Finding(None, "contradictory", [e for _, e in votes], fold_dtype)
    if kinds:
        return Finding(kinds.pop(), "certain", [e for _, e in votes], fold_dtype)
    return Finding(None, "weak", ["no quantization entry, no model card naming mlx-lm"], fold_dtype)


def text_losses(path: Path, config: Dict[str, Any], weights, fold_dtype: str) -> Optional[Dict[str, float]]:
    """Mean next-token loss (nats) of TEXT, tokenized by the folder's own
    tokenizer, under each reading; None without a tokenizer or for a quantized
    folder (a quantized folder has a quantization entry, which decides)."""
    if config.get("quantization") is not None:
        return None
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return None
    from mlx_lm.utils import load_tokenizer

    ids = load_tokenizer(path).encode(TEXT)
    if len(ids) < 8:
        return None
    tokens = mx.array(ids)[None]
    losses = {}
    for kind in SOURCE_FORMATS:
        runtime, folds = runtime_config(config, weights, kind, fold_dtype)
        model = Model(ModelArgs.from_dict(runtime))
        model.load_weights(list(model.sanitize(apply_factors(weights, folds, config)).items()), strict=True)
        logits = model(tokens[:, :-1]).astype(mx.float32)
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        nll = -mx.take_along_axis(logp, tokens[:, 1:, None], axis=-1).mean()
        losses[kind] = float(nll.item())
    return losses


def decide(path: Path, config, weights, told: Optional[str] = None) -> Finding:
    """recognise(), then the text test when nothing else decides; refuses
    (SourceFormatError naming the flag) what stays contradictory or weak."""
    finding = recognise(path, config, weights, told)
    if finding.kind is None and finding.sure == "weak":
        losses = text_losses(path, config, weights, finding.fold_dtype)
        if losses is None:
            finding.evidence.append("no tokenizer to try a fixed text with")
        else:
            best, other = sorted(losses, key=losses.get)
            said = ", ".join(f"{k} reading {v:.2f}" for k, v in losses.items())
            uniform = float(np.log(int(config["vocab_size"])))
            if losses[other] - losses[best] >= TEXT_MARGIN and losses[best] < uniform - TEXT_MARGIN:
                finding = Finding(best, "likely", [f"a fixed text costs nats/token: {said}"], finding.fold_dtype)
            else:
                finding.evidence.append(f"the fixed text does not tell ({said}; uniform {uniform:.2f})")
    if finding.kind is None:
        raise SourceFormatError(
            finding.line(path) + ". Say which: mlx-falcon-h1-convert --upgrade "
            f"{path} --source-format {'|'.join(SOURCE_FORMATS)} (repairs it for every app), "
            f"or load it with model_config={{'{SOURCE_FORMAT_KEY}': ...}} "
            f"(commands: {SOURCE_FORMAT_ENV}=...)"
        )
    return finding


def _round(value: float, dtype: str) -> float:
    return mx.array(value, dtype=getattr(mx, dtype)).astype(mx.float32).item()


def exact_factors(config: Dict[str, Any]) -> Dict[str, Any]:
    """What transformers applies to each weight (and to the head), as Python floats."""
    m = {name: float(config.get(name, 1.0)) for name in MULTIPLIERS}
    mlp = [float(x) for x in config.get("mlp_multipliers") or [1.0, 1.0]]
    mup = [float(x) for x in config.get("ssm_multipliers") or [1.0] * 5]
    a_in = m["attention_in_multiplier"]
    return {
        "embed": m["embedding_multiplier"],
        "head": m["lm_head_multiplier"],
        "q": a_in,
        "k": a_in * m["key_multiplier"],
        "v": a_in,
        "o": m["attention_out_multiplier"],
        "in": [m["ssm_in_multiplier"] * x for x in mup],
        "out": m["ssm_out_multiplier"],
        "gate": mlp[0],
        "down": mlp[1],
    }


def carried_factors(config: Dict[str, Any], kind: str, fold_dtype: str, tied: bool) -> Dict[str, Any]:
    """What the folder's weights already carry, per tensor (see the module docstring)."""
    if kind == "unfolded":
        return {k: ([1.0] * 5 if k == "in" else 1.0) for k in exact_factors(config)}
    r = lambda x: _round(x, fold_dtype)  # noqa: E731
    m = {name: float(config.get(name, 1.0)) for name in MULTIPLIERS}
    mlp = [float(x) for x in config.get("mlp_multipliers") or [1.0, 1.0]]
    mup = [float(x) for x in config.get("ssm_multipliers") or [1.0] * 5]
    ssm_in = r(m["ssm_in_multiplier"])
    carried = {
        "embed": r(m["embedding_multiplier"]),
        "head": r(m["lm_head_multiplier"]),
        "q": r(m["attention_in_multiplier"]),
        "k": r(m["attention_in_multiplier"]),
        "v": 1.0,
        "o": r(m["attention_out_multiplier"]),
        "in": [r(ssm_in * r(x)) for x in mup],
        "out": r(m["ssm_out_multiplier"]),
        "gate": r(mlp[0]),
        "down": r(mlp[1]),
    }
    if tied:  # the head is the embedding matrix
        carried["head"] = carried["embed"]
    return carried


def _ratio(a, b):
    return [x / y for x, y in zip(a, b)] if isinstance(a, list) else a / b


def missing_factors(config, kind: str, fold_dtype: str, tied: bool) -> Dict[str, Any]:
    """exact / carried: what each weight still needs (1.0: nothing)."""
    exact, carried = exact_factors(config), carried_factors(config, kind, fold_dtype, tied)
    return {k: _ratio(exact[k], carried[k]) for k in exact}


def _check_no_linear_biases(weights) -> None:
    # mlx-lm never folds a bias; no published Falcon-H1 has these biases, so
    # what a foreign folder's biases carry has never been observed.
    for name in weights:
        module, param = name.rsplit(".", 1)
        if param == "bias" and any(module.endswith(s) for s in ATTENTION_MLP):
            raise SourceFormatError(
                f"tensor {name}: a folder made by another tool with linear biases is not "
                "supported (no published Falcon-H1 has them); convert the original checkpoint"
            )


def runtime_config(config: Dict[str, Any], weights, kind: str, fold_dtype: str):
    """(config, weight factors) that make our Model compute transformers' model
    from this folder's weights: the multipliers at run time as config.json
    fields, and the one factor they cannot express (v_proj's, when q_proj
    carries attention_in and v_proj does not) as {tensor suffix: factor}."""
    _check_no_linear_biases(weights)
    tied = "lm_head.weight" not in weights  # the tensors say, not a config default
    need = missing_factors(config, kind, fold_dtype, tied)
    a_in = need["q"]  # run time scales q, k and v's input together
    runtime = dict(config)
    runtime.update(
        tie_word_embeddings=tied,
        embedding_multiplier=need["embed"],
        lm_head_multiplier=need["head"],
        attention_in_multiplier=a_in,
        key_multiplier=need["k"] / a_in,
        attention_out_multiplier=need["o"],
        ssm_in_multiplier=1.0,
        ssm_multipliers=need["in"],
        ssm_out_multiplier=need["out"],
        mlp_multipliers=[need["gate"], need["down"]],
    )
    v = need["v"] / a_in
    folds = {} if v == 1.0 else {"self_attn.v_proj": v}
    return runtime, folds


def weight_factors(config: Dict[str, Any], weights, kind: str, fold_dtype: str) -> Dict[str, Any]:
    """{tensor suffix: factor} that makes the weights carry every multiplier
    exactly (the head's under "lm_head", the embedding's under "embed_tokens")."""
    _check_no_linear_biases(weights)
    tied = "lm_head.weight" not in weights
    need = missing_factors(config, kind, fold_dtype, tied)
    # A tied head is the embedding matrix, which then carries exactly emb;
    # format 2 states the head's lm / emb for run time.
    factors = {"model.embed_tokens": need["embed"]}
    if not tied:
        factors["lm_head"] = need["head"]
    for suffix, key in ATTENTION_MLP.items():
        factors[suffix] = need[key]
    return factors


def _row_factor(factor, config) -> Any:
    """A scalar, or in_proj's per-row vector (z | x | B | C | dt)."""
    if not isinstance(factor, list):
        return factor
    args = ModelArgs.from_dict(config)
    gn = args.mamba_n_groups * args.mamba_d_state
    sizes = [args.mamba_d_ssm, args.mamba_d_ssm, gn, gn, args.mamba_n_heads]
    return np.concatenate([np.full(s, f, dtype=np.float64) for s, f in zip(sizes, factor)])


def apply_factors(weights: Dict[str, mx.array], factors: Dict[str, Any], config=None, keep_dtype=False):
    """weights with each module's weight (or affine scales and biases) times its
    factor, computed in float32; kept in float32 unless keep_dtype (then the
    stored dtype, as a repaired folder writes them)."""
    if not factors:
        return weights
    out = dict(weights)
    mode = ((config or {}).get("quantization") or {}).get("mode", "affine")
    for name, w in weights.items():
        module, param = name.rsplit(".", 1)
        factor = next((f for s, f in factors.items() if module.endswith(s)), None)
        if factor is None or param not in ("weight", "scales", "biases"):
            continue
        quantized = f"{module}.scales" in weights
        if quantized and param == "weight":
            continue  # the codes stay; scales (and affine biases) carry the factor
        if isinstance(factor, list):
            f = mx.array(_row_factor(factor, config), dtype=mx.float32)[:, None]
        else:
            f = factor
        if np.all(np.asarray(f) == 1.0):
            continue
        if quantized and mode != "affine":
            exps = np.log2(np.abs(np.asarray(f, dtype=np.float64)))
            if not np.all(exps == np.round(exps)):
                raise SourceFormatError(
                    f"tensor {name}: {mode} scales take powers of two only, and {module} "
                    "needs a factor that is not one; convert the original checkpoint"
                )
        new = w.astype(mx.float32) * f
        out[name] = new.astype(w.dtype) if keep_dtype or quantized else new
    return out


def source_format_from(model_config: Optional[Dict[str, Any]]) -> Optional[str]:
    return (model_config or {}).get(SOURCE_FORMAT_KEY) or os.environ.get(SOURCE_FORMAT_ENV) or None


def as_runnable(path: Path, config: Dict[str, Any], weights, told: Optional[str] = None):
    """The loader's hook: (config, weights) that run this foreign folder as
    transformers' model in our Model, after saying in one line what it is."""
    finding = decide(path, config, weights, told)
    print(f"[mlx-falcon-h1] {finding.line(path)}", file=sys.stderr)
    runtime, folds = runtime_config(config, weights, finding.kind, finding.fold_dtype)
    runtime.pop(SOURCE_FORMAT_KEY, None)
    # Our record, marked foreign: the multipliers above are run-time values for
    # these weights, which nothing may fold again (the converter refuses it).
    runtime[FORMAT_KEY] = {"format_version": 2, "foreign": finding.kind, "evidence": finding.evidence}
    return runtime, apply_factors(weights, folds, config)  # Model.sanitize widens what it must


def describe_factors(factors: Dict[str, Any]) -> List[str]:
    """Human-readable lines of the factors that are not 1."""
    lines = []
    for name, f in factors.items():
        values = f if isinstance(f, list) else [f]
        if any(v != 1.0 for v in values):
            shown = "[" + ", ".join(f"{v:.9g}" for v in values) + "]" if isinstance(f, list) else f"{f:.9g}"
            lines.append(f"{name} x {shown}")
    return lines
