"""`mlx-falcon-h1-convert --upgrade PATH` for folders made by another tool.

A folder made by mlx-lm's converter (or its pre-release branch; see
mlx_falcon_h1/foreign_folders.py) is rewritten in place into our format 2:
every factor its weights lack is multiplied into them (a dense weight in
float32, then stored in its dtype again; an affine-quantized one through its
scales and biases, codes untouched), SSM parameters, conv and norms are widened
to float32 as our converter keeps them, and config.json states what is left to
apply at run time (1.0, or lm / emb for a tied head), with the originals
recorded. Stock mlx-lm, LM Studio's mlx-engine and mlx-swift-lm then compute
transformers' model from it (folder_format.py says what each reads), except
where folder_format.consumer_caveats says a consumer cannot.

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
from mlx_falcon_h1.loading import make_args, read_config, safetensors_header, weight_files
from mlx_falcon_h1.config import ModelArgs
from mlx_falcon_h1.model import with_float32_parameters


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


def repaired_config(config: Dict[str, Any], finding, tied: bool) -> Dict[str, Any]:
    """config.json of the repaired folder: every field spelled out as resolved
    (the consumers' defaults differ from transformers': tie_word_embeddings,
    rope_theta from rope_parameters ...), the multipliers at their run-time values."""
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
    return folder_format.folded_config(out, originals, upgraded_from=upgraded_from)


def upgrade_foreign(mlx_path: str, source_format: Optional[str] = None, dry_run: bool = False) -> bool:
    """Repair a foreign folder in place (see the module docstring); returns
    whether it changed (with dry_run: would change) anything."""
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
    new_config = repaired_config(config, finding, tied)
    changes = foreign_folders.describe_factors(factors)
    caveats = folder_format.consumer_caveats(make_args(new_config, path / "config.json"), new_config)
    if dry_run:
        print(f"[dry run] {path}: would multiply into the weights: " + ("; ".join(changes) or "nothing"))
        print("[dry run] would rewrite config.json as format 2: run-time multipliers "
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
            shard = with_float32_parameters(shard)
            mx.save_safetensors(str(tmp / file.name), shard, metadata=foreign_folders.safetensors_metadata(file))
            total += sum(w.nbytes for w in shard.values())
            del shard
        index = tmp / "model.safetensors.index.json"
        if index.is_file():  # the widened float32 tensors change its total
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
    print(f"[done] {path}: repaired in place; multiplied into the weights: " + ("; ".join(changes) or "nothing"))
    for consumer, reasons in caveats.items():
        print(f"[warning] {consumer} does not compute this folder exactly: " + "; ".join(reasons)
              + ". Run it with mlx_falcon_h1.")
    return True
