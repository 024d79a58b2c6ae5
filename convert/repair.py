"""`mlx-falcon-h1-convert --upgrade PATH` for folders made by another tool.

A folder made by mlx-lm's converter (or its pre-release branch; see
mlx_falcon_h1/foreign_folders.py) is rewritten in place into our current format:
every factor its weights lack is multiplied into them (a dense weight in
float32, then stored in its dtype again; an affine-quantized one through its
scales and biases, codes untouched), SSM parameters, conv and norms stay in the
weights' dtype as mlx-lm wrote them (widened to float32 only with
--ssm-dtype float32: folder_format.py says what that costs other apps), and
config.json states what is left to apply at run time (1.0, or lm / emb for a
tied head), with the originals recorded. Stock mlx-lm, LM Studio's mlx-engine
and mlx-swift-lm then compute transformers' model from it (folder_format.py
says what each reads), except where folder_format.consumer_caveats says a
consumer cannot.

Atomic: the repaired folder is written beside the original and swapped in by
renames; an error leaves the original as it was.
"""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx

from mlx_falcon_h1 import folder_format, foreign_folders
from mlx_falcon_h1.config import ModelArgs
from mlx_falcon_h1.loading import make_args, read_config, safetensors_header, weight_files
from mlx_falcon_h1.parameter_dtypes import is_ssm_parameter, layout_dtype


def _conv_shape(path: Path):
    for file in weight_files(path):
        entry = safetensors_header(file).get(foreign_folders.CONV)
        if entry is not None:
            return tuple(entry["shape"])
    return None


def is_foreign_folder(path: Path, config: Dict[str, Any]) -> bool:
    return foreign_folders.is_foreign(config, _conv_shape(path))


def refuse_foreign(path: Path, config: Dict[str, Any]) -> None:
    """For convert(): a foreign folder is not a Hugging Face checkpoint (its
    weights carry some multipliers); it is repaired with --upgrade."""
    if is_foreign_folder(path, config):
        raise ValueError(
            f"{path}: an MLX folder made by another tool (mlx-lm's converter?), not a Hugging "
            f"Face checkpoint; repair it in place with: mlx-falcon-h1-convert --upgrade {path}"
        )


def repaired_config(config: Dict[str, Any], finding, tied: bool, ssm_dtype: Optional[str]) -> Dict[str, Any]:
    """config.json of the repaired folder: every field spelled out as resolved
    (the consumers' defaults differ from transformers': tie_word_embeddings,
    rope_theta from rope_parameters ...), the multipliers at their run-time
    values, the layout (ssm_dtype None: the default, not chosen)."""
    args = make_args({**config, "tie_word_embeddings": tied}, Path("config.json"))
    out = dict(config)
    for f in dataclasses.fields(ModelArgs):
        if f.name != folder_format.FORMAT_KEY:
            value = getattr(args, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    out["rope_theta"] = args.rope_base
    if args.rope_scaling_config is not None:
        out["rope_scaling"] = args.rope_scaling_config
    originals = folder_format.original_multipliers(config)
    upgraded_from = {"source_format": finding.kind, "sure": finding.sure,
                     "evidence": finding.evidence, "fold_dtype": finding.fold_dtype}  # fmt: skip
    return folder_format.folded_config(out, originals, upgraded_from=upgraded_from, ssm_dtype=ssm_dtype or "weights",
                                       ssm_dtype_chosen=ssm_dtype is not None)  # fmt: skip


def upgrade_foreign(mlx_path: str, source_format: Optional[str] = None, dry_run: bool = False,
                    ssm_dtype: Optional[str] = None) -> bool:  # fmt: skip
    """Repair a foreign folder in place (see the module docstring), its SSM
    parameters, conv and norms in the layout `ssm_dtype` names (None: the
    weights' dtype); returns whether it changed (with dry_run: would change) anything."""
    path = Path(mlx_path)
    config = read_config(path)
    files = weight_files(path)
    weights = {}
    for file in files:
        weights.update(mx.load(str(file)))
    finding = foreign_folders.decide(path, config, weights, source_format)
    print(f"[found] {finding.line(path)}")
    factors = foreign_folders.weight_factors(config, weights, finding.kind, finding.fold_dtype)
    tied = "lm_head.weight" not in weights
    new_config = repaired_config(config, finding, tied, ssm_dtype)
    changes = foreign_folders.describe_factors(factors)
    dtype = layout_dtype(weights, ssm_dtype)
    small = {k for k, w in weights.items() if is_ssm_parameter(k, w)}
    cast = {k for k in small if weights[k].dtype != dtype}
    layout = f"SSM parameters, conv and norms in {str(dtype).removeprefix('mlx.core.')} ({len(cast)} tensors cast)"
    layout += (f", as asked: {folder_format.float32_layout_cost()}" if ssm_dtype == "float32"
               else ", the weights' dtype, so no app casts weights at run time")  # fmt: skip
    caveats = folder_format.consumer_caveats(make_args(new_config, path / "config.json"), new_config)
    if dry_run:
        print(f"[dry run] {path}: would multiply into the weights: " + ("; ".join(changes) or "nothing"))
        print(f"[dry run] would store {layout}")
        print(f"[dry run] would rewrite config.json as format {folder_format.FORMAT_VERSION}: run-time multipliers "
              + json.dumps(folder_format.runtime_multipliers(folder_format.original_multipliers(config), tied)))
        for consumer, reasons in caveats.items():
            print(f"[dry run] {consumer} still would not compute it exactly: " + "; ".join(reasons))
        return True

    parent = path.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.upgrade-", dir=parent))
    try:
        for item in path.iterdir():
            if item.suffix != ".safetensors" and item.name != "config.json":
                (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        total = 0
        for file in files:
            shard = mx.load(str(file))
            shard = foreign_folders.apply_factors(shard, factors, config, keep_dtype=True)
            shard = {k: w.astype(dtype) if k in small else w for k, w in shard.items()}
            mx.save_safetensors(str(tmp / file.name), shard, metadata=foreign_folders.safetensors_metadata(file))
            total += sum(w.nbytes for w in shard.values())
            del shard
        index = tmp / "model.safetensors.index.json"
        if index.is_file():  # tensors cast to another dtype change its total
            data = json.loads(index.read_text())
            data.setdefault("metadata", {})["total_size"] = total
            index.write_text(json.dumps(data, indent=4))
        from mlx_lm.utils import save_config  # encodes inf as mlx-lm and transformers 5 read it

        save_config(new_config, tmp / "config.json")
        tmp.chmod(path.stat().st_mode & 0o777)
        old = path.with_name(f".{path.name}.replaced-{os.getpid()}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"[done] {path}: repaired in place; multiplied into the weights: " + ("; ".join(changes) or "nothing")
          + f"; {layout}")
    for consumer, reasons in caveats.items():
        print(f"[warning] {consumer} does not compute this folder exactly: " + "; ".join(reasons)
              + ". Run it with mlx_falcon_h1.")
    return True
