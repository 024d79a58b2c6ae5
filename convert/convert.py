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
norm are never quantized; Linear and Embedding weights are quantized when their
input size fits the group size and left alone otherwise. Every unquantized
tensor is stored in the target dtype, as mlx-lm stores it, so no consumer
promotes its activations to float32 (folder_format.py); `--ssm-dtype float32`
keeps those parameters in float32 at a cost in every other app, which the
converter states. Our runtime computes them in float32 from either layout.

The steps have a file each: reading.py (the source), folding.py (multipliers
and dtypes), writing.py (the folder); this file is the command.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from mlx_falcon_h1 import cli, folder_format
from mlx_falcon_h1.folder_format import FORMAT_KEY, SSM_DTYPES
from mlx_falcon_h1.loading import make_args, read_config, resolve_path, weight_files
from mlx_falcon_h1.model import Model
from mlx_falcon_h1.parameter_dtypes import is_ssm_parameter, layout_dtype, with_float32_parameters
from mlx_falcon_h1.quantize import METHODS, CalibrationSettings, calibrated_quantize, check_target_bpw, dynamic_settings
from mlx_falcon_h1.quantize import add_arguments as add_calibration_arguments
from mlx_falcon_h1.quantize import settings_from as calibration_settings

from . import repair
from .folding import cast_calibrated, cast_weights, float32_layout_traffic, fold_multipliers
from .quality import quality_report
from .reading import Source, read_source
from .recipes import RECIPES, make_recipe
from .writing import (
    MAX_SHARD_BYTES,
    card_with_layout,
    model_card,
    move_into_place,
    prepare_destination,
    recast_in_place,
    replace_file,
    resolved_config,
    write_config_file,
    write_folder,
)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# What mx.quantize takes in each mode: (bits, group sizes, (default bits, default
# group size)), from the table in its docstring (MLX 0.32); the defaults are
# also mlx-lm's quantize_model's. Checked here, a setting it would refuse ends
# the command before any weights are read rather than after (minutes for a 34B).
# tests/test_convert.py probes mx.quantize against this table, so an MLX that
# adds a mode or a width shows up there.
Q_MODES = {
    "affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128), (4, 64)),
    "mxfp4": ((4,), (32,), (4, 32)),
    "nvfp4": ((4,), (16,), (4, 16)),
    "mxfp8": ((8,), (32,), (8, 32)),
}


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
    ssm_dtype: Optional[str] = None,
    max_shard_size_gb: float = MAX_SHARD_BYTES / (1 << 30),
    report_tokens: int = 256,
    remote_code: bool = False,
    method: Optional[str] = None,
    **calibration,
) -> Optional[dict]:
    """Convert `hf_path` (folder or Hub repo id) into an MLX folder at `mlx_path`.

    Keyword arguments mirror the command-line flags; `method` and the
    calibration flags (`calibration_data`, `num_samples`, ...: see
    mlx_falcon_h1/quantize/settings.py) quantize with a calibrated method.
    Returns the quality report of a quantized conversion (also written to
    quality_report.json), else None. `ssm_dtype` None is the default layout,
    "weights", recorded as not chosen (so a later default may change it).
    """
    calibrated = _checked_flags(quantize, dequantize, q_mode, dtype, ssm_dtype, quant_predicate,
                                dict(calibration, method=method))  # fmt: skip
    if quantize:
        _check_quantization(q_mode, q_bits, q_group_size, quant_predicate, calibrated)
    source_path = resolve_path(hf_path)
    mlx_path = Path(mlx_path)
    if mlx_path.resolve() == source_path.resolve():
        raise ValueError(f"{mlx_path}: the output folder cannot be the input folder")

    tmp = prepare_destination(mlx_path, force)
    try:
        started = time.time()
        source, weights = read_source(source_path, dequantize)
        target = DTYPES[dtype] if dtype else source.dtype
        layout = ssm_dtype or "weights"
        model, config = _output_model(source, weights, target, layout, ssm_dtype is not None, str(hf_path))
        del weights  # the model holds what is written; the source's tensors may go
        settings = {"dtype": str(target).removeprefix("mlx.core."), "ssm_dtype": layout}
        record = None
        if quantize and calibrated is not None:
            bits, group_size = _quant_setting("affine", q_bits, q_group_size)
            q, record = _calibrate(model, source.path, bits, group_size, calibrated, target, layout)
            config = {**config, "quantization": q, "quantization_config": q}
            settings.update(q_mode="affine", q_bits=bits, q_group_size=group_size, **record)
        elif quantize:
            predicate = quant_predicate
            if isinstance(predicate, str):
                predicate = make_recipe(predicate, model, q_group_size, q_mode)
            from mlx_lm.utils import quantize_model

            model, config = quantize_model(
                model, config, q_group_size, q_bits, mode=q_mode, quant_predicate=predicate
            )
            q = config["quantization"]
            settings.update(
                q_mode=q["mode"], q_bits=q["bits"], q_group_size=q["group_size"],
                quant_predicate=quant_predicate if isinstance(quant_predicate, str) else
                ("custom" if quant_predicate else "default"),
            )  # fmt: skip

        params = dict(tree_flatten(model.parameters()))
        args = model.args
        del model  # the shards must hold the only references, to be freed one by one
        if layout == "float32":
            _say_float32_cost(params, target)
        write_folder(tmp, source.path, params, config, int(max_shard_size_gb * (1 << 30)), remote_code)
        report = _quality(source.path, tmp, report_tokens, record) if quantize else None
        (tmp / "README.md").write_text(model_card(str(hf_path), settings, report))
        move_into_place(tmp, mlx_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    _warn_consumers(args, config, remote_code)
    print(f"[done] {mlx_path} in {time.time() - started:.1f} s")
    if upload_repo:
        from mlx_lm.utils import upload_to_hub

        upload_to_hub(str(mlx_path), upload_repo)
    return report


def _checked_flags(quantize, dequantize, q_mode, dtype, ssm_dtype, quant_predicate,
                   calibration: dict) -> Optional[CalibrationSettings]:  # fmt: skip
    """Refuse flags that contradict each other; the calibration settings, if a --method is given."""
    if quantize and dequantize:
        raise ValueError("--quantize and --dequantize are exclusive")
    if q_mode not in Q_MODES:
        raise ValueError(f"--q-mode {q_mode!r}: choose one of {', '.join(Q_MODES)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if ssm_dtype is not None and ssm_dtype not in SSM_DTYPES:
        raise ValueError(f"--ssm-dtype {ssm_dtype!r}: choose one of {', '.join(SSM_DTYPES)}")
    if isinstance(quant_predicate, str) and quant_predicate not in RECIPES:
        raise ValueError(f"--quant-predicate {quant_predicate!r}: choose one of {', '.join(RECIPES)}")
    method = calibration.get("method")
    calibrated = calibration_settings(calibration)
    if calibrated is not None:
        if not quantize:
            raise ValueError(f"--method {method} quantizes: add -q")
        if q_mode != "affine":
            raise ValueError(f"--method {method} learns affine scales and biases: use --q-mode affine")
        if quant_predicate is not None:
            raise ValueError("--method and --quant-predicate are exclusive (--method dynamic mixes bits itself)")
    return calibrated


def _quant_setting(q_mode: str, q_bits: Optional[int], q_group_size: Optional[int]):
    """(bits, group size) of a mode, its defaults filling what is not given."""
    default_bits, default_group_size = Q_MODES[q_mode][2]
    return q_bits or default_bits, q_group_size or default_group_size


def _check_quantization(q_mode, q_bits, q_group_size, quant_predicate,
                        calibrated: Optional[CalibrationSettings]) -> None:  # fmt: skip
    """Refuse, before anything is read, a quantization that mx.quantize would
    refuse once the weights are in memory, naming the settings that work."""
    if isinstance(quant_predicate, str) and q_mode != "affine":
        raise ValueError(f"--quant-predicate {quant_predicate} mixes affine bit widths; use --q-mode affine")
    bits, group_size = _quant_setting(q_mode, q_bits, q_group_size)
    allowed_bits, allowed_group_sizes, _ = Q_MODES[q_mode]
    wrong = [f"--q-bits {bits}"] if bits not in allowed_bits else []
    wrong += [f"--q-group-size {group_size}"] if group_size not in allowed_group_sizes else []
    if wrong:
        raise ValueError(
            f"--q-mode {q_mode} takes --q-bits {_one_of(allowed_bits)} and --q-group-size "
            f"{_one_of(allowed_group_sizes)}, not {' and '.join(wrong)}"
        )
    if calibrated is not None and calibrated.method == "dynamic":
        low, high, target = dynamic_settings(bits, group_size, calibrated)
        for name, (b, g) in (("low", low), ("high", high)):
            if b not in allowed_bits or g not in allowed_group_sizes:
                raise ValueError(
                    f"--method dynamic: its {name} setting would be {b}-bit g{g}; set --{name}-bits "
                    f"{_one_of(allowed_bits)} and --{name}-group-size {_one_of(allowed_group_sizes)}"
                )
        check_target_bpw(low, high, target)


def _one_of(values) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def _output_model(source: Source, weights: Dict[str, mx.array], target: mx.Dtype, layout: str, chosen: bool,
                  described: str):  # fmt: skip
    """(model, config) of the output folder: the weights with the multipliers
    folded in (unless they already carry them) and cast, in the one model built
    from the output's config, which applies only the multipliers left to apply
    (calibration runs it, so it must compute what the output computes)."""
    if not folder_format.is_folded(source.config):
        weights = fold_multipliers(weights, source.args)
    cast_weights(weights, target, layout)
    originals = folder_format.original_multipliers(source.config)
    config = folder_format.folded_config(source.config, originals, source=described, ssm_dtype=layout,
                                         ssm_dtype_chosen=chosen)  # fmt: skip
    args = make_args(config, source.path / "config.json")
    model = Model(args)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model, resolved_config(config, args)


def _calibrate(model, source: Path, bits: int, group_size: int, settings: CalibrationSettings,
               target: mx.Dtype, layout: str):  # fmt: skip
    """Calibrated quantization in place; (quantization config, calibration record).
    Calibration computes in float32, the SSM parameters, conv and norms widened
    as our loader widens them; the weights are then cast as a plain conversion
    writes them."""
    from mlx_lm.utils import load_tokenizer

    model.update(tree_unflatten(list(with_float32_parameters(dict(tree_flatten(model.parameters()))).items())))
    q, record = calibrated_quantize(model, load_tokenizer(source), bits, group_size, settings, scale_dtype=target)
    cast_calibrated(model, target, layout)
    return q, record


def _say_float32_cost(params: Dict[str, mx.array], target: mx.Dtype) -> None:
    """--ssm-dtype float32: what it costs this folder in other apps."""
    kept = sum(w.size for k, w in params.items() if is_ssm_parameter(k, w))
    extra = kept * (4 - target.size)
    traffic = float32_layout_traffic(params) if target != mx.float32 else 0
    print(f"[layout] --ssm-dtype float32: SSM parameters, conv and norms in float32 ({_mb(extra)} "
          f"more than in {str(target).removeprefix('mlx.core.')}); {folder_format.float32_layout_cost()}; "
          f"here ~{_mb(traffic)} more memory traffic per token by arithmetic. "
          "mlx_falcon_h1 computes them in float32 from either layout, at no cost.")  # fmt: skip


def _quality(source: Path, folder: Path, tokens: int, calibration: Optional[dict]) -> dict:
    """The quality report of the quantized `folder` against `source`, written beside it."""
    report = quality_report(source, folder, tokens)
    if calibration is not None:
        report["calibration"] = calibration
    (folder / "quality_report.json").write_text(json.dumps(report, indent=2))
    print(
        f"[quality] {report['tokens']} tokens: mean KL {report['mean_kl']:.4g}, "
        f"top-1 agreement {report['top1_agreement']:.4f}, "
        f"max logit diff {report['max_logit_diff']:.4g}"
    )
    return report


def _warn_consumers(args, config: dict, remote_code: bool) -> None:
    for consumer, caveats in folder_format.consumer_caveats(args, config).items():
        if consumer == folder_format.MLX_LM and remote_code:
            continue  # mlx-lm runs our implementation from the folder
        fix = " or convert with --remote-code" if consumer == folder_format.MLX_LM else ""
        print(
            f"[warning] {consumer} does not compute this folder as the reference: "
            + "; ".join(caveats)
            + f". Run it with mlx_falcon_h1{fix}."
        )


def upgrade(mlx_path: str, source_format: Optional[str] = None, dry_run: bool = False,
            ssm_dtype: Optional[str] = None) -> bool:  # fmt: skip
    """Bring a folder made by an earlier version of this converter to the current
    format in place: config.json as it writes it (format 1 restated the
    multipliers the weights carry) and the SSM parameters, conv and norms in the
    layout `ssm_dtype` names, else the one a format-3 record chose, else the
    default (the weights' dtype; formats 1 and 2 kept them float32, which makes
    other apps cast weights every step). Each file is replaced whole
    (writing.recast_in_place; config.json last). A folder made by another tool
    is repaired (repair.py). Returns whether anything changed (with dry_run:
    would change)."""
    path = Path(mlx_path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such folder")
    if ssm_dtype is not None and ssm_dtype not in SSM_DTYPES:
        raise ValueError(f"--ssm-dtype {ssm_dtype!r}: choose one of {', '.join(SSM_DTYPES)}")
    config = read_config(path)
    record = folder_format.record(config)
    if not record and repair.is_foreign_folder(path, config):
        return repair.upgrade_foreign(path, source_format, dry_run, ssm_dtype)
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
    make_args(config, path / "config.json")  # refuse a config we could not run
    current = folder_format.format_version(config) == folder_format.FORMAT_VERSION
    layout = ssm_dtype or (record.get("ssm_dtype", "weights") if current else "weights")
    chosen = ssm_dtype is not None or (current and bool(record.get("ssm_dtype_chosen")))
    upgraded = folder_format.upgraded_config(config, ssm_dtype=layout, ssm_dtype_chosen=chosen)
    tensors = {}
    for file in weight_files(path):
        tensors.update(mx.load(str(file)))
    dtype = layout_dtype(tensors, layout)
    casts = {k: w for k, w in tensors.items() if is_ssm_parameter(k, w) and w.dtype != dtype}
    if not casts and upgraded == config:
        print(f"[done] {path}: already format {folder_format.FORMAT_VERSION}, nothing to do")
        return False
    changes = _layout_changes(casts, dtype, tensors)
    if folder_format.restates_multipliers(config):
        changes.append("config.json states the multipliers left to apply (mlx-swift-lm applied "
                       "key_multiplier twice)")  # fmt: skip
    if dry_run:
        print(f"[dry run] {path}: would upgrade to format {folder_format.FORMAT_VERSION}: " + "; ".join(changes))
        return True
    recast_in_place(path, {k: dtype for k in casts})
    replace_file(path / "config.json", lambda tmp: write_config_file(tmp, upgraded))
    card = path / "README.md"
    if card.is_file() and "with mlx-falcon-h1-convert" in (text := card.read_text()):
        replace_file(card, lambda tmp: tmp.write_text(card_with_layout(text, layout)))
    print(f"[done] {path}: upgraded to format {folder_format.FORMAT_VERSION}: " + "; ".join(changes))
    return True


def _layout_changes(casts: Dict[str, mx.array], dtype: mx.Dtype, tensors: Dict[str, mx.array]) -> list:
    """What casting `casts` ({name: tensor}) to `dtype` changes, in words."""
    name = str(dtype).removeprefix("mlx.core.")
    if not casts:
        return [f"SSM parameters, conv and norms already {name}"]
    before = sum(w.nbytes for w in casts.values())
    after = sum(w.size * dtype.size for w in casts.values())
    rounded = sum(not mx.array_equal(w, w.astype(dtype)).item() for w in casts.values())
    exact = "values unchanged" if not rounded else f"{rounded} of them rounded to {name}"
    line = f"{len(casts)} tensors (A_log, D, dt_bias, conv1d, norms) to {name}, {_mb(before)} -> {_mb(after)}, {exact}"
    if dtype == mx.float32:
        return [f"{line}; as asked: {folder_format.float32_layout_cost()}"]
    return [f"{line}: stock mlx-lm and other apps now decode without casting weights "
            f"(~{_mb(float32_layout_traffic(tensors))} less memory traffic per token, by arithmetic)"]  # fmt: skip


def _mb(n: int) -> str:
    return f"{n / 1e6:.3g} MB"


def configure_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert a Hugging Face Falcon-H1 checkpoint to (quantized) MLX weights."
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf-path", "--model", help="Local folder or Hub repo id.")
    source.add_argument("--upgrade", metavar="PATH",
                        help="Repair a folder in place so every MLX app reads it right and fast: "
                        "one converted by an earlier version, or by mlx-lm's converter or its "
                        "pre-release branch.")  # fmt: skip
    p.add_argument("--source-format", choices=("mlx-lm", "unfolded"), default=None,
                   help="With --upgrade: which tool made a folder whose evidence does not tell "
                   "(mlx-lm: its converter, which folds; unfolded: its pre-release branch).")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="With --upgrade: say what would change.")
    p.add_argument("--mlx-path", default="mlx_model", help="Output folder (default: mlx_model).")
    p.add_argument("-q", "--quantize", action="store_true", help="Quantize the weights.")
    p.add_argument("--q-group-size", type=int, default=None, help="Group size (mode default).")
    p.add_argument("--q-bits", type=int, default=None, help="Bits per weight (mode default).")
    p.add_argument("--q-mode", default="affine", choices=list(Q_MODES), help="Quantization mode.")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="Dtype of the non-quantized weights (default: the checkpoint's).")  # fmt: skip
    p.add_argument("--quant-predicate", choices=RECIPES, default=None,
                   help="Mixed-precision recipe.")  # fmt: skip
    p.add_argument("-d", "--dequantize", action="store_true",
                   help="Dequantize a quantized MLX folder.")  # fmt: skip
    p.add_argument("--upload-repo", default=None, help="Hub repo to upload the result to.")
    p.add_argument("--force", action="store_true", help="Replace an existing --mlx-path.")
    p.add_argument("--ssm-dtype", choices=SSM_DTYPES, default=None,
                   help="A_log, D, dt_bias, conv1d and norms in the weights' dtype (weights, the "
                   "default: no app casts weights at run time) or in float32: "
                   + folder_format.float32_layout_cost().replace("%", "%%")
                   + ". mlx_falcon_h1 computes them in float32 either way. With --upgrade: "
                   "the layout to bring the folder to.")  # fmt: skip
    p.add_argument("--max-shard-size-gb", type=float, default=MAX_SHARD_BYTES / (1 << 30))
    p.add_argument("--remote-code", action="store_true",
                   help="Make mlx-lm's --trust-remote-code run this package's implementation "
                   "from the folder (mlx-lm then needs that flag to load it).")  # fmt: skip
    add_calibration_arguments(p)
    return p


def main(argv=None):
    args = vars(configure_parser().parse_args(argv))
    upgrade_path = args.pop("upgrade")
    source_format, dry_run = args.pop("source_format"), args.pop("dry_run")

    def command():
        if upgrade_path is not None:
            return upgrade(upgrade_path, source_format, dry_run, args["ssm_dtype"])
        if source_format is not None or dry_run:
            raise ValueError("--source-format and --dry-run go with --upgrade")
        return convert(**args)

    cli.call(command, argv)


def quantize_main(argv=None):
    """`python -m mlx_falcon_h1.quantize`: this command with -q and a --method."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--method" not in argv and not any(a.startswith("--method=") for a in argv):
        raise SystemExit(f"python -m mlx_falcon_h1.quantize: error: --method is required ({', '.join(METHODS)})")
    main(["-q", *argv] if not {"-q", "--quantize"} & set(argv) else argv)


if __name__ == "__main__":
    main()
