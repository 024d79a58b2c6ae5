"""LoRA / DoRA adapters on our Falcon-H1, with trained SSM (or other) parameters.

mlx-lm's adapter layers and loader, plus `lora_parameters.trainable`: parameters
of a layer trained beside the adapters (`--train-ssm`: A_log, D, dt_bias) and
saved with them. Low in the package: the loader applies adapters with it, and
the tuner command (lora.py) builds on it.
"""

import json
import types
from pathlib import Path
from typing import Dict, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner import utils as tuner_utils

from .fused_projections import unfuse_projections


def _unfreeze_extra(model: nn.Module, num_layers: int, names: Sequence[str]) -> None:
    """Make the parameters at `names` (paths inside a layer) of the last `num_layers` layers trainable."""
    for layer in model.layers[-max(num_layers, 0) :]:  # mlx-lm's choice of layers
        known = dict(tree_flatten(layer.parameters()))
        for name in names:
            if name not in known:
                raise ValueError(
                    f"lora_parameters.trainable: {name!r} is not a parameter of a "
                    f"Falcon-H1 layer; choose from {', '.join(sorted(known))}"
                )
            path, _, leaf = name.rpartition(".")
            module = layer
            for part in path.split(".") if path else []:
                module = module[int(part)] if isinstance(module, list) else getattr(module, part)
            module.unfreeze(keys=[leaf], recurse=False)


def linear_to_lora_layers(
    model: nn.Module, num_layers: int, config: Dict, use_dora: bool = False
) -> None:
    """mlx-lm's conversion to LoRA/DoRA layers, plus config["trainable"] parameters."""
    unfuse_projections(model)  # adapters train the plain layout (load() fuses for generation)
    tuner_utils.linear_to_lora_layers(model, num_layers, config, use_dora=use_dora)
    _unfreeze_extra(model, num_layers, config.get("trainable") or ())


def load_adapters(model: nn.Module, adapter_path: str) -> nn.Module:
    """mlx-lm's load_adapters, which also restores trained SSM (or other) parameters."""
    unfuse_projections(model)  # adapters name the plain layout's layers
    adapter_path = Path(adapter_path)
    config_file = adapter_path / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing; is {adapter_path} an adapter folder?")
    config = types.SimpleNamespace(**json.loads(config_file.read_text()))
    extra = (getattr(config, "lora_parameters", None) or {}).get("trainable") or []
    fine_tune_type = getattr(config, "fine_tune_type", "lora")
    if not extra or fine_tune_type == "full":
        return tuner_utils.load_adapters(model, str(adapter_path))

    linear_to_lora_layers(
        model, config.num_layers, config.lora_parameters, use_dora=fine_tune_type == "dora"
    )
    weights = mx.load(str(adapter_path / "adapters.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    allowed = {
        name
        for name in params
        if name.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m")  # LoRA and DoRA leaves
        or any(name.endswith("." + e) for e in extra)
    }
    errors = [
        f"  {name}: not a parameter this adapter config trains"
        if name not in allowed
        else f"  {name}: shape {tuple(w.shape)}, the model's is {tuple(params[name].shape)}"
        for name, w in weights.items()
        if name not in allowed or w.shape != params[name].shape
    ]
    if errors:
        raise ValueError(f"{adapter_path}: incompatible adapter tensors:\n" + "\n".join(errors))
    model.load_weights(list(weights.items()), strict=False)
    return model
