"""Reading the source of a conversion: a Hugging Face checkpoint, or a folder
this converter wrote (to convert again, or to dequantize), through the
package's one checkpoint reader (mlx_falcon_h1/loading.py)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_falcon_h1.loading import load_model, read_checkpoint, read_config
from mlx_falcon_h1.model import ModelArgs
from mlx_falcon_h1.parameter_dtypes import weights_dtype

from .repair import refuse_foreign


@dataclass
class Source:
    path: Path
    config: Dict[str, Any]  # its config.json, read once
    args: ModelArgs  # what that config states (the multipliers as trained, or as left to apply)
    dtype: mx.Dtype  # the weights' dtype (parameter_dtypes.weights_dtype): what --dtype defaults to


def read_source(path: Path, dequantize: bool) -> Tuple[Source, Dict[str, mx.array]]:
    """The checked config of `path` and its weights, named and shaped as the
    model's parameters; with `dequantize`, a quantized folder's weights
    dequantized (and its quantization settings dropped)."""
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model, config = load_model(path, lazy=True)
        if "quantization" not in config:
            raise ValueError(f"{path}: --dequantize needs a quantized MLX checkpoint")
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
        weights = dict(tree_flatten(model.parameters()))
    else:
        refuse_foreign(path, read_config(path))  # repaired in place with --upgrade instead
        model, config, weights = read_checkpoint(path)
        if "quantization" in config:
            raise ValueError(f"{path}: already quantized; use --dequantize first")
    return Source(path, config, model.args, weights_dtype(weights)), weights

