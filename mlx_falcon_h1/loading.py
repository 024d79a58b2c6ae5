"""Load a Falcon-H1 checkpoint folder (Hugging Face's, or our converter's).

Everything a user can get wrong is checked here, before MLX sees it, and
reported with the file, tensor or config field at fault. `read_checkpoint` is
the one reader of a folder; the loader, the converter and the memory planner
use it. `sharded_load` loads one model split over processes (parallel.py).
"""

import json
import struct
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import load_tokenizer

from . import foreign_folders, mlx_lm_patches
from .adapters import load_adapters  # mlx-lm's, plus adapters that trained SSM parameters
from .config import ConfigError, ModelArgs
from .folder_format import needs_upgrade, record, restates_multipliers
from .fused_projections import fuse_projections
from .model import Model
from .parameter_dtypes import weights_dtype

# FORMAT_KEY: our converter's record in config.json of what it did to the
# weights (folded multipliers, layout). Its presence is what makes MLX-layout
# weights trustworthy; a folder in MLX layout without it was made by another
# tool and is read as foreign_folders.py works out.

class CheckpointError(ValueError):
    """A checkpoint folder whose files or tensors do not make a Falcon-H1 model."""


def resolve_path(path_or_repo: str, revision: Optional[str] = None) -> Path:
    """A local folder as is; anything else is tried as a Hugging Face Hub repo id."""
    path = Path(path_or_repo).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint folder, found a file")
        return path
    if str(path_or_repo).startswith((".", "/", "~")) or str(path_or_repo).count("/") != 1:
        raise CheckpointError(f"{path}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        allow = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py"]
        return Path(snapshot_download(path_or_repo, revision=revision, allow_patterns=allow))
    except Exception as e:  # offline, not found, gated: all end here
        raise CheckpointError(
            f"{path_or_repo}: not a local folder, and fetching it from the Hugging Face "
            f"Hub failed ({type(e).__name__}: {e})"
        ) from None


def _tagged_float(obj: dict):
    # transformers 5 writes non-finite floats as {"__float__": "Infinity"}.
    if obj.keys() == {"__float__"}:
        return float(obj["__float__"])
    return obj


def read_config(path: Path) -> Dict[str, Any]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing; a checkpoint folder needs config.json")
    try:
        config = json.loads(config_file.read_text(), object_hook=_tagged_float)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config_file}: unreadable ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    if config.get("model_type") != "falcon_h1":
        raise CheckpointError(
            f"{config_file}: model_type is {config.get('model_type')!r}; this package "
            "loads Falcon-H1 ('falcon_h1') checkpoints only"
        )
    return config


def make_args(config: Dict[str, Any], config_file: Path) -> ModelArgs:
    try:
        return ModelArgs.from_dict(config)
    except ConfigError as e:
        raise ConfigError(f"{config_file}: {str(e).removeprefix('config.json: ')}") from None
    except (TypeError, ValueError) as e:  # e.g. a size given as a string
        raise ConfigError(f"{config_file}: a field has the wrong type ({e})") from None


def weight_files(path: Path) -> list:
    """A checkpoint folder's safetensors files (its index's shards, or every one)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.exists():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: unreadable index ({e!r})") from None
        files = sorted({path / name for name in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index_file.name} but missing")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weight files")
    return files


def safetensors_header(file: Path) -> Dict[str, Any]:
    """A safetensors file's header ({tensor name: {dtype, shape, data_offsets}}),
    read without the data; a truncated or corrupt file is rejected from it, before
    MLX maps it."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError("header length runs past the end of the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{file}: truncated ({size} bytes, its header describes {8 + n + end})"
        )
    return header


def _read_weights(files) -> Tuple[Dict[str, mx.array], Dict[str, Path]]:
    weights, origin = {}, {}
    for file in files:
        safetensors_header(file)  # a clear error for a truncated or corrupt file
        try:
            tensors = mx.load(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: MLX could not read it ({e})") from None
        for name, w in tensors.items():
            if name in weights:
                raise CheckpointError(f"{file}: tensor {name} also appears in {origin[name]}")
            weights[name] = w
            origin[name] = file
    return weights, origin


def _quantize(model: Model, quantization: Dict[str, Any], weights) -> None:
    def predicate(p, m):
        if p in quantization:  # per-layer settings, as mlx-lm writes them
            return quantization[p]
        return hasattr(m, "to_quantized") and f"{p}.scales" in weights

    nn.quantize(
        model,
        group_size=quantization.get("group_size", 64),
        bits=quantization.get("bits", 4),
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def _check_tensors(model: Model, weights, origin, path: Path) -> None:
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{more}")
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(
            f"{origin[extra[0]]}: unexpected tensor(s) {', '.join(extra[:5])}{more}"
        )
    for name, w in expected.items():
        if weights[name].shape != w.shape:
            raise CheckpointError(
                f"{origin.get(name, path)}: tensor {name} has shape "
                f"{tuple(weights[name].shape)}, the config needs {tuple(w.shape)}"
            )


def read_checkpoint(
    path: str, model_config: Optional[Dict[str, Any]] = None
) -> Tuple[Model, Dict[str, Any], Dict[str, mx.array]]:
    """Read and check a checkpoint folder (Hugging Face's or a converted one).

    Returns (model, config, weights): the model built from the config (quantized
    as it says, weights not yet loaded) and the tensors named and shaped as its
    parameters. Raises CheckpointError / ConfigError (both ValueError) naming
    the file, tensor or field at fault.
    """
    path = resolve_path(path)
    config = read_config(path)
    if model_config:
        config.update(model_config)
    args = make_args(config, path / "config.json")
    model = Model(args)

    weights, origin = _read_weights(weight_files(path))
    conv = weights.get(foreign_folders.CONV)  # a folder made by mlx-lm's converter (or its branch)?
    if foreign_folders.is_foreign(config, None if conv is None else conv.shape):
        told = foreign_folders.source_format_from(model_config)
        try:
            config, weights = foreign_folders.as_runnable(path, config, weights, told)
        except foreign_folders.SourceFormatError as e:
            raise CheckpointError(str(e)) from None
        args = make_args(config, path / "config.json")
        model = Model(args)
    weights = model.sanitize(weights)  # keeps names, so `origin` still applies
    if (quantization := config.get("quantization")) is not None:
        _quantize(model, quantization, weights)
    _check_tensors(model, weights, origin, path)
    return model, config, weights


def load_model(
    path: str,
    lazy: bool = False,
    model_config: Optional[Dict[str, Any]] = None,
) -> Tuple[Model, Dict[str, Any]]:
    """Build a Falcon-H1 Model from a checkpoint folder and load its weights.

    Returns (model, config). Raises CheckpointError / ConfigError (both
    ValueError) naming the file, tensor or field at fault. Installs this
    package's patches of mlx-lm (mlx_lm_patches.py), which mlx-lm's generation
    needs to run the model as its flags say.
    """
    mlx_lm_patches.install()
    model, config, weights = read_checkpoint(path, model_config)
    if problems := _older_format_problems(config, weights):
        warnings.warn(
            f"{path}: converted by an earlier mlx-falcon-h1-convert; it runs right here, but "
            f"{' and '.join(problems)}. Upgrade it in place: mlx-falcon-h1-convert --upgrade {path}",
            stacklevel=2,
        )
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def _older_format_problems(config: Dict[str, Any], weights) -> list:
    """What an older format of our converter gets wrong in other apps (what --upgrade fixes)."""
    problems = []
    if restates_multipliers(config):
        problems.append("mlx-swift-lm apps apply its key multiplier twice")
    # Formats 1 and 2 kept them float32 (an --upgrade repair records no ssm_dtype).
    if (needs_upgrade(config) and record(config).get("ssm_dtype", "float32") == "float32"
            and weights_dtype(weights) != mx.float32):  # fmt: skip
        problems.append("its float32 SSM parameters, conv and norms make mlx-lm and other apps "
                        "cast weights to float32 at every token")  # fmt: skip
    return problems


def load(
    path_or_hf_repo: str,
    tokenizer_config: Optional[Dict[str, Any]] = None,
    model_config: Optional[Dict[str, Any]] = None,
    adapter_path: Optional[str] = None,
    lazy: bool = False,
    return_config: bool = False,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    fuse: bool = True,
):
    """(model, tokenizer[, config]) the way mlx_lm.load returns them, through our model.

    fuse: for generation, each layer's projections fused into 4 matmuls
    (fused_projections.py; after any adapters, whose layers stay apart);
    fused_projections.unfuse_projections gives the plain layout back."""
    path = resolve_path(path_or_hf_repo, revision)
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((path / f).exists() for f in tokenizer_files):
        raise CheckpointError(
            f"{path}: no tokenizer files ({', '.join(tokenizer_files)}); "
            "use load_model() for weights alone"
        )
    model, config = load_model(path, lazy=lazy, model_config=model_config)
    if adapter_path is not None:
        model = load_adapters(model, adapter_path)
        model.eval()
    if fuse:
        fuse_projections(model, evaluate=not lazy)
    tokenizer = load_tokenizer(
        path, tokenizer_config, eos_token_ids=config.get("eos_token_id", None)
    )
    return (model, tokenizer, config) if return_config else (model, tokenizer)


def sharded_load(
    path_or_hf_repo: str,
    pipeline_group: Optional[mx.distributed.Group] = None,
    tensor_group: Optional[mx.distributed.Group] = None,
    return_config: bool = False,
    *,
    tokenizer_config: Optional[dict] = None,
    trust_remote_code: bool = False,
):
    """mlx_lm.utils.sharded_load on our model: load lazily, split, then read.

    With no group given, tensor parallelism over the global group. Each rank
    reads only the weights it keeps (and, for tensor parallelism, every tensor
    it slices, one at a time).
    """
    model, tokenizer, config = load(
        path_or_hf_repo,
        tokenizer_config=tokenizer_config,
        lazy=True,
        return_config=True,
        trust_remote_code=trust_remote_code,
        fuse=False,  # parallel.py splits the plain layout
    )
    if pipeline_group is None and tensor_group is None:
        tensor_group = mx.distributed.init()
    if pipeline_group is not None:
        model.pipeline(pipeline_group)
    if tensor_group is not None:
        model.shard(tensor_group)
    mx.eval(model.parameters())
    # Wait for every rank to finish loading, so none times out in its first call.
    mx.eval(mx.distributed.all_sum(mx.array(1.0), stream=mx.cpu))
    return (model, tokenizer, config) if return_config else (model, tokenizer)
