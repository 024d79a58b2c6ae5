"""mlx-falcon-h1-convert: a Hugging Face Falcon-H1 checkpoint to (quantized) MLX weights.

The output runs the same in this package, in stock mlx-lm (`mlx_lm.load`,
`mlx_lm.generate`, `mlx_lm.server`, apps built on it) and in mlx-swift-lm: the
muP multipliers are folded into the weights once, the conv1d weights are stored
in MLX layout (which tells both ports not to fold again), and config.json states
only what is left to apply at run time, with the originals recorded under
"mlx_falcon_h1" (mlx_falcon_h1/folder_format.py: what each consumer reads).
`--upgrade PATH` rewrites a folder made by an earlier version in that form, and
repairs one made by mlx-lm's converter or its pre-release branch (repair.py).

Falcon-aware precision: A_log, D, dt_bias, the conv1d weights and biases and every
norm stay float32 and are never quantized; Linear and Embedding weights are
quantized when their input size fits the group size and left alone otherwise.
"""

import argparse
import dataclasses
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map_with_path
from tqdm import tqdm

from mlx_falcon_h1 import folder_format
from mlx_falcon_h1.folder_format import FORMAT_KEY
from mlx_falcon_h1.loading import (
    CheckpointError,
    load_model,
    make_args,
    read_checkpoint,
    read_config,
    resolve_path,
)
from mlx_falcon_h1.model import ModelArgs
from mlx_falcon_h1.quantize import add_arguments as add_calibration_arguments
from mlx_falcon_h1.quantize import calibrated_quantize
from mlx_falcon_h1.quantize import settings_from as calibration_settings

from . import repair  # issue 21 hook
from .quality import quality_report
from .recipes import RECIPES, make_recipe

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
Q_MODES = ("affine", "mxfp4", "nvfp4", "mxfp8")
# Files copied beside the weights so the folder is a complete model.
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


# With --remote-code, `mlx_lm.load(..., trust_remote_code=True)` (and every mlx-lm
# command's --trust-remote-code) builds the model from this file: our implementation.
REMOTE_CODE_FILE = "falcon_h1_mlx.py"
REMOTE_CODE = '''"""Written by mlx-falcon-h1-convert --remote-code: runs this folder with
mlx-falcon-h1's Falcon-H1 (pip install mlx-falcon-h1) instead of mlx-lm's built-in one."""

try:
    from mlx_falcon_h1.model import Model, ModelArgs  # noqa: F401
except ImportError as e:
    raise ImportError(
        "This model folder runs on mlx-falcon-h1: pip install mlx-falcon-h1"
    ) from e
'''


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


def _rebuilt(model, args: ModelArgs):
    """A Model for `args` holding `model`'s parameters (the same arrays)."""
    from mlx_falcon_h1.model import Model

    rebuilt = Model(args)
    rebuilt.load_weights(tree_flatten(model.parameters()), strict=True)
    rebuilt.eval()
    return rebuilt


def _cast_calibrated(model, target: mx.Dtype, before: Dict[str, mx.Dtype]) -> None:
    """After calibration (which computes in float32): the dtypes a plain
    conversion writes. Scales, biases and other weights in `target`; SSM
    parameters, conv and norms as they were before (`before`: path -> dtype)."""
    keep = model.cast_predicate

    def cast(path, w):
        if not mx.issubdtype(w.dtype, mx.floating):
            return w
        return w.astype(target if keep(path) else before.get(path, mx.float32))

    model.update(tree_map_with_path(cast, model.parameters()))


def _source_dtype(weights) -> mx.Dtype:
    floats = [w.dtype for w in weights.values() if mx.issubdtype(w.dtype, mx.floating)]
    return max(set(floats), key=floats.count) if floats else mx.float32


def _write_weights(folder: Path, params: Dict[str, mx.array], max_shard_bytes: int) -> None:
    """Evaluate and write one shard at a time, dropping each after it is written,
    so peak memory stays near one shard plus what it is computed from."""
    names = sorted(params)
    shards, current, size = [], [], 0
    for name in names:
        nbytes = params[name].nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    fmt = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    index = {"metadata": {"total_size": sum(params[n].nbytes for n in names)}, "weight_map": {}}
    for i, shard_names in enumerate(tqdm(shards, desc="Writing shards", unit="shard")):
        file = fmt.format(i + 1, len(shards))
        shard = {n: params.pop(n) for n in shard_names}
        mx.save_safetensors(str(folder / file), shard, metadata={"format": "mlx"})
        index["weight_map"].update({n: file for n in shard_names})
        del shard
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=4))


def _write_config_file(file: Path, config: dict) -> None:
    from mlx_lm.utils import save_config  # encodes inf as mlx-lm and transformers 5 read it

    save_config(dict(config), file)


def _model_card(source: str, settings: dict, report: Optional[dict]) -> str:
    lines = [
        "---",
        "library_name: mlx",
        "tags: [mlx, falcon-h1]",
        "---",
        "# Falcon-H1 for MLX",
        "",
        f"Converted from `{source}` with mlx-falcon-h1-convert.",
        "",
        "## Conversion settings",
        "",
    ]
    lines += [f"- {k}: `{v}`" for k, v in settings.items()]
    lines += [
        "",
        "muP multipliers are folded into the weights; config.json states only what is",
        "left to apply at run time (the originals are recorded under `mlx_falcon_h1`),",
        "so mlx-lm, apps built on it and mlx-swift-lm apps all compute the reference.",
        "A_log, D, dt_bias, conv1d and norms are kept in float32.",
        "",
        "## Use",
        "",
        "```bash",
        "python -m mlx_falcon_h1.generate --model PATH --prompt 'Hello'",
        "mlx_lm.generate --model PATH --prompt 'Hello'   # stock mlx-lm also loads it",
        "```",
    ]
    if report is not None:
        lines += [
            "",
            "## Quality report (quantized vs float, fixed token sequence)",
            "",
            "| tokens | mean KL | top-1 agreement | max logit diff |",
            "|---|---|---|---|",
            f"| {report['tokens']} | {report['mean_kl']:.3g} | {report['top1_agreement']:.4f}"
            f" | {report['max_logit_diff']:.3g} |",
        ]
    return "\n".join(lines) + "\n"


def _prepare_destination(mlx_path: Path, force: bool) -> Path:
    if mlx_path.exists() and not force:
        raise ValueError(
            f"{mlx_path}: already exists; choose another --mlx-path or pass --force to replace it"
        )
    parent = mlx_path.parent.resolve()
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{mlx_path.name}.partial-", dir=parent))
    except OSError as e:
        raise ValueError(f"{parent}: cannot write the output there ({e.strerror})") from None
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folders are private; a model folder is not
    return tmp


def _move_into_place(tmp: Path, mlx_path: Path) -> None:
    old = None
    if mlx_path.exists():  # only reached with --force
        old = mlx_path.with_name(f".{mlx_path.name}.replaced-{os.getpid()}")
        mlx_path.rename(old)
    tmp.rename(mlx_path)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()


def convert(
    hf_path: str,
    mlx_path: str = "mlx_model",
    quantize: bool = False,
    q_group_size: Optional[int] = None,
    q_bits: Optional[int] = None,
    q_mode: str = "affine",
    dtype: Optional[str] = None,
    quant_predicate: Optional[Union[str, Callable]] = None,
    dequantize: bool = False,
    upload_repo: Optional[str] = None,
    force: bool = False,
    ssm_dtype: str = "float32",
    max_shard_size_gb: float = MAX_SHARD_BYTES / (1 << 30),
    report_tokens: int = 256,
    remote_code: bool = False,
    method: Optional[str] = None,
    **calibration,
) -> Optional[dict]:
    """Convert `hf_path` (folder or Hub repo id) into an MLX folder at `mlx_path`.

    Keyword arguments mirror the command-line flags; `method` and the
    calibration flags (`calibration_data`, `num_samples`, ...: see
    mlx_falcon_h1/quantize.py) quantize with a calibrated method. Returns the
    quality report of a quantized conversion (also written to
    quality_report.json), else None.
    """
    if quantize and dequantize:
        raise ValueError("--quantize and --dequantize are exclusive")
    if q_mode not in Q_MODES:
        raise ValueError(f"--q-mode {q_mode!r}: choose one of {', '.join(Q_MODES)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if ssm_dtype not in ("float32", "source"):
        raise ValueError(f"--ssm-dtype {ssm_dtype!r}: choose 'float32' or 'source'")
    if isinstance(quant_predicate, str) and quant_predicate not in RECIPES:
        raise ValueError(f"--quant-predicate {quant_predicate!r}: choose one of {', '.join(RECIPES)}")
    calibrated = calibration_settings(dict(calibration, method=method))
    if calibrated is not None:
        if not quantize:
            raise ValueError(f"--method {method} quantizes: add -q")
        if q_mode != "affine":
            raise ValueError(f"--method {method} learns affine scales and biases: use --q-mode affine")
        if quant_predicate is not None:
            raise ValueError("--method and --quant-predicate are exclusive (--method dynamic mixes bits itself)")

    source = resolve_path(hf_path)
    config = read_config(source)
    repair.refuse_foreign(source, config)  # issue 21 hook: foreign folders take --upgrade
    args = make_args(config, source / "config.json")
    originals = folder_format.original_multipliers(config)
    mlx_path = Path(mlx_path)
    if mlx_path.resolve() == source.resolve():
        raise ValueError(f"{mlx_path}: the output folder cannot be the input folder")

    tmp = _prepare_destination(mlx_path, force)
    try:
        started = time.time()
        if dequantize:
            if "quantization" not in config:
                raise ValueError(f"{source}: --dequantize needs a quantized MLX checkpoint")
            from mlx_lm.utils import dequantize_model

            model = dequantize_model(load_model(source, lazy=True)[0])
            config.pop("quantization", None)
            config.pop("quantization_config", None)
            weights = dict(tree_flatten(model.parameters()))
            source_dtype = _source_dtype(weights)
        else:
            if "quantization" in config:
                raise ValueError(f"{source}: already quantized; use --dequantize first")
            model, config, weights = read_checkpoint(source)
            source_dtype = _source_dtype(weights)
            if not folder_format.is_folded(config):
                weights = fold_multipliers(weights, args)

        # Precision: SSM parameters, conv and norms in float32 (or their source
        # dtype with ssm_dtype="source"); everything else in `dtype`.
        target = DTYPES[dtype] if dtype else source_dtype
        keep = model.cast_predicate
        for name, w in weights.items():
            if not mx.issubdtype(w.dtype, mx.floating):
                continue
            if keep(name):
                weights[name] = w.astype(target)
            elif ssm_dtype == "float32":
                weights[name] = w.astype(mx.float32)
        model.load_weights(list(weights.items()), strict=True)
        del weights

        settings = {"dtype": str(target).removeprefix("mlx.core."), "ssm_dtype": ssm_dtype}
        if quantize and calibrated is not None:
            from mlx_lm.utils import load_tokenizer

            bits, group_size = q_bits or 4, q_group_size or 64
            # Calibration runs the model: it must apply only what the folded
            # weights do not carry, i.e. the multipliers the output's config states.
            folded = folder_format.folded_config(config, originals)
            model = _rebuilt(model, make_args(folded, source / "config.json"))
            before = {k: v.dtype for k, v in tree_flatten(model.parameters())}
            q, record = calibrated_quantize(
                model, load_tokenizer(source), bits, group_size, calibrated, scale_dtype=target
            )
            _cast_calibrated(model, target, before)
            config["quantization"] = q
            config["quantization_config"] = q
            settings.update(q_mode="affine", q_bits=bits, q_group_size=group_size, **record)
        elif quantize:
            from mlx_lm.utils import quantize_model

            predicate = quant_predicate
            if isinstance(predicate, str):
                predicate = make_recipe(predicate, model, q_group_size, q_mode)
            model, config = quantize_model(
                model, config, q_group_size, q_bits, mode=q_mode, quant_predicate=predicate
            )
            q = config["quantization"]
            settings.update(
                q_mode=q["mode"], q_bits=q["bits"], q_group_size=q["group_size"],
                quant_predicate=quant_predicate if isinstance(quant_predicate, str) else
                ("custom" if quant_predicate else "default"),
            )  # fmt: skip

        # Every field spelled out as resolved: mlx-lm's and mlx-swift-lm's
        # defaults differ from transformers' (tie_word_embeddings,
        # mamba_norm_before_gate, head_dim ...) and both read the RoPE base from
        # rope_theta only. The multipliers: what is left to apply at run time.
        for f in dataclasses.fields(ModelArgs):
            if f.name != FORMAT_KEY:
                value = getattr(args, f.name)
                config[f.name] = list(value) if isinstance(value, tuple) else value
        config["rope_theta"] = args.rope_base
        if args.rope_scaling_config is not None:
            config["rope_scaling"] = args.rope_scaling_config
        config = folder_format.folded_config(
            config, originals, source=str(hf_path), ssm_dtype=ssm_dtype
        )

        params = dict(tree_flatten(model.parameters()))
        del model  # the shards below must hold the only references, to be freed one by one
        _write_weights(tmp, params, int(max_shard_size_gb * (1 << 30)))
        for name in EXTRA_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)

        if remote_code:
            (tmp / REMOTE_CODE_FILE).write_text(REMOTE_CODE)
            config["model_file"] = REMOTE_CODE_FILE
        _write_config_file(tmp / "config.json", config)

        report = None
        if quantize:
            report = quality_report(source, tmp, report_tokens)
            if calibrated is not None:
                report["calibration"] = record
            (tmp / "quality_report.json").write_text(json.dumps(report, indent=2))
            print(
                f"[quality] {report['tokens']} tokens: mean KL {report['mean_kl']:.4g}, "
                f"top-1 agreement {report['top1_agreement']:.4f}, "
                f"max logit diff {report['max_logit_diff']:.4g}"
            )
        (tmp / "README.md").write_text(_model_card(str(hf_path), settings, report))
        _move_into_place(tmp, mlx_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    for consumer, caveats in folder_format.consumer_caveats(args, config).items():
        if consumer == folder_format.MLX_LM and remote_code:
            continue  # mlx-lm runs our implementation from the folder
        fix = " or convert with --remote-code" if consumer == folder_format.MLX_LM else ""
        print(
            f"[warning] {consumer} does not compute this folder as the reference: "
            + "; ".join(caveats)
            + f". Run it with mlx_falcon_h1{fix}."
        )
    print(f"[done] {mlx_path} in {time.time() - started:.1f} s")
    if upload_repo:
        from mlx_lm.utils import upload_to_hub

        upload_to_hub(str(mlx_path), upload_repo)
    return report


def upgrade(mlx_path: str, source_format: Optional[str] = None, dry_run: bool = False) -> bool:
    """Rewrite the config.json of a folder made by an earlier version of this
    converter (format 1) as format 2 writes it, in place; the weights stay as
    they are. Atomic: the new file replaces the old in one rename. Returns
    whether anything changed (False for a folder already in format 2)."""
    path = Path(mlx_path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder")
    config = read_config(path)
    record = folder_format.record(config)
    if not record and repair.is_foreign_folder(path, config):  # issue 21 hook
        return repair.upgrade_foreign(path, source_format, dry_run)
    if not record:
        raise ValueError(
            f"{path / 'config.json'}: no '{FORMAT_KEY}' record, so this folder was not made "
            "by mlx-falcon-h1-convert and what its weights carry is unknown; convert the "
            "original Hugging Face checkpoint instead"
        )
    if not record.get("multipliers_folded"):
        raise ValueError(
            f"{path / 'config.json'}: its weights do not carry the multipliers (e.g. fused "
            "LoRA adapters on a Hugging Face base); convert it: "
            f"mlx-falcon-h1-convert --hf-path {path} --mlx-path NEW_FOLDER"
        )
    if not folder_format.needs_upgrade(config):
        print(f"[done] {path}: already format {folder_format.FORMAT_VERSION}, nothing to do")
        return False
    make_args(config, path / "config.json")  # refuse a config we could not run
    upgraded = folder_format.upgraded_config(config)
    if dry_run:  # issue 21 hook: --dry-run
        print(f"[dry run] {path}: would rewrite config.json as format {folder_format.FORMAT_VERSION}")
        return True
    tmp = path / f".config.json.upgrade-{os.getpid()}"
    try:
        _write_config_file(tmp, upgraded)
        os.replace(tmp, path / "config.json")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    print(f"[done] {path}: config.json upgraded to format {folder_format.FORMAT_VERSION}")
    return True


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a Hugging Face Falcon-H1 checkpoint to (quantized) MLX weights."
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", "--model", help="Local folder or Hub repo id.")
    source.add_argument("--upgrade", metavar="PATH",  # issue 21 hook: the help text
                        help="Repair a folder in place so every MLX app reads it right: one "
                        "converted by an earlier version (config.json only), or by mlx-lm's "
                        "converter or its pre-release branch (weights too).")  # fmt: skip
    # issue 21 hook: --upgrade of folders made by mlx-lm's converter or its pre-release branch
    p.add_argument("--source-format", choices=("mlx-lm", "unfolded"), default=None,
                   help="With --upgrade: which tool made a folder whose evidence does not tell "
                   "(mlx-lm: its converter, which folds; unfolded: its pre-release branch).")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="With --upgrade: say what would change.")
    p.add_argument("--mlx-path", default="mlx_model", help="Output folder (default: mlx_model).")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights.")
    p.add_argument("--q-group-size", type=int, default=None, help="Group size (mode default).")
    p.add_argument("--q-bits", type=int, default=None, help="Bits per weight (mode default).")
    p.add_argument("--q-mode", default="affine", choices=Q_MODES, help="Quantization mode.")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="Dtype of the non-quantized weights (default: the checkpoint's).")  # fmt: skip
    p.add_argument("--quant-predicate", choices=RECIPES, default=None,
                   help="Mixed-precision recipe.")  # fmt: skip
    p.add_argument("-d", "--dequantize", action="store_true",
                   help="Dequantize a quantized MLX folder.")  # fmt: skip
    p.add_argument("--upload-repo", default=None, help="Hub repo to upload the result to.")
    p.add_argument("--force", action="store_true", help="Replace an existing --mlx-path.")
    p.add_argument("--ssm-dtype", choices=("float32", "source"), default="float32",
                   help="Keep A_log, D, dt_bias, conv1d and norms in float32 (default) "
                   "or in the checkpoint's dtype.")  # fmt: skip
    p.add_argument("--max-shard-size-gb", type=float, default=MAX_SHARD_BYTES / (1 << 30))
    p.add_argument("--remote-code", action="store_true",
                   help="Make mlx-lm's --trust-remote-code run this package's implementation "
                   "from the folder (mlx-lm then needs that flag to load it).")  # fmt: skip
    add_calibration_arguments(p)
    return p


def main(argv=None):
    args = vars(configure_parser().parse_args(argv))
    try:
        source_format, dry_run = args.pop("source_format"), args.pop("dry_run")  # issue 21 hook
        if (path := args.pop("upgrade")) is not None:
            upgrade(path, source_format, dry_run)
        elif source_format is not None or dry_run:
            raise ValueError("--source-format and --dry-run go with --upgrade")
        else:
            convert(**args)
    except (ValueError, CheckpointError) as e:
        raise SystemExit(f"mlx-falcon-h1-convert: error: {e}")


if __name__ == "__main__":
    main()
