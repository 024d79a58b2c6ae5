"""`python -m mlx_falcon_h1.lora`: mlx-lm's LoRA / DoRA / full fine-tuning on our Falcon-H1.

Same flags, data formats and YAML config as `mlx_lm.lora` (train, evaluate,
test, resume); `python -m mlx_falcon_h1.fuse` is `mlx_lm.fuse`. Only these
differ:

- The model is built by this package's loader, so training and evaluation run
  our implementation (muP multipliers, grouped gated norm ...).
- Training and testing run the pure-MLX reference path of the Mamba2 ops
  (MLX_FALCON_H1_KERNELS=0 unless set otherwise): it is differentiable through
  and through, and mlx-lm compiles the training step around it.
- The default LoRA targets are mlx-lm's: every Linear of the tuned layers, which
  for Falcon-H1 is attention (q/k/v/o_proj), the Mamba projections
  (in_proj, out_proj) and the MLP (gate/up/down_proj). `lora_parameters.keys`
  narrows them, as in mlx-lm.
- The SSM parameters can be trained beside the adapters: `--train-ssm` (or
  `train_ssm: true` in the YAML config) adds A_log, D and dt_bias of the tuned
  layers; `lora_parameters.trainable` lists any parameters by their path in a
  layer (e.g. ["mamba.A_log", "mamba.conv1d.weight"]). They are saved in
  adapters.safetensors and restored by `load_adapters` below (and the fuse).
- A fused model is saved so that our loader reloads it to the same logits:
  weights keep the base's folding state (a LoRA delta is added inside the
  Linear, before any multiplier), and config.json records that state under
  "mlx_falcon_h1" (see `save`).
"""

import json
import os
import sys
import types
from pathlib import Path
from typing import Dict, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm import lora as mlx_lm_lora
from mlx_lm import utils as mlx_lm_utils
from mlx_lm.tuner import utils as tuner_utils

from .commands import run_mlx_lm_command
from .loading import FORMAT_KEY
from .loading import load as load_base

# --train-ssm: the Mamba2 parameters that are neither Linear nor conv.
SSM_PARAMETERS = ("mamba.A_log", "mamba.D", "mamba.dt_bias")


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
    tuner_utils.linear_to_lora_layers(model, num_layers, config, use_dora=use_dora)
    _unfreeze_extra(model, num_layers, config.get("trainable") or ())


def load_adapters(model: nn.Module, adapter_path: str) -> nn.Module:
    """mlx-lm's load_adapters, which also restores trained SSM (or other) parameters."""
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


def load(path_or_hf_repo: str, adapter_path: Optional[str] = None, **kwargs):
    """mlx_falcon_h1.load, with adapters (and trained SSM parameters) applied."""
    out = load_base(path_or_hf_repo, **kwargs)
    if adapter_path is not None:
        load_adapters(out[0], adapter_path)
        out[0].eval()
    return out


def save(dst_path, src_path_or_repo, model, tokenizer, config, donate_model: bool = True):
    """mlx_lm.utils.save, recording in config.json how the weights hold the multipliers.

    A LoRA delta is added inside each Linear, before any muP multiplier, so
    fused weights are folded exactly when the base's were. A converted base
    carries our record already ("multipliers_folded": true) and keeps it. A
    Hugging Face base has unfolded weights and no record; saved in MLX layout
    without one, our loader would rightly refuse them (it could not tell what
    is folded), so they get "multipliers_folded": false and the multipliers
    keep being applied at run time. `mlx-falcon-h1-convert` turns such a folder
    into a folded one for stock mlx-lm.
    """
    config = dict(config)
    if FORMAT_KEY not in config:
        config[FORMAT_KEY] = {"multipliers_folded": False, "source": str(src_path_or_repo)}
    mlx_lm_utils.save(dst_path, src_path_or_repo, model, tokenizer, config, donate_model)


def _build_parser():
    parser = mlx_lm_lora_build_parser()
    parser.add_argument(
        "--train-ssm",
        action="store_true",
        default=None,
        help="Also train the SSM parameters (A_log, D, dt_bias) of the tuned layers.",
    )
    return parser


def _run(args, training_callback=None):
    if args.model == mlx_lm_lora.CONFIG_DEFAULTS["model"]:  # mlx-lm's default: not a Falcon-H1
        sys.exit("python -m mlx_falcon_h1.lora: --model is required (a Falcon-H1 folder or Hub repo)")
    extra = list((args.lora_parameters or {}).get("trainable") or [])
    if getattr(args, "train_ssm", None):
        extra += [name for name in SSM_PARAMETERS if name not in extra]
    if extra:
        args.lora_parameters = {**args.lora_parameters, "trainable": extra}
    return mlx_lm_lora_run(args, training_callback)


mlx_lm_lora_build_parser = mlx_lm_lora.build_parser
mlx_lm_lora_run = mlx_lm_lora.run


def main() -> None:
    # Kernels have no gradients of their own; train on the reference ops
    # (an explicit MLX_FALCON_H1_KERNELS=1 is respected).
    os.environ.setdefault("MLX_FALCON_H1_KERNELS", "0")
    run_mlx_lm_command(
        "lora",
        require_model=False,  # it may come from the YAML config; _run checks
        load=load,
        load_adapters=load_adapters,
        linear_to_lora_layers=linear_to_lora_layers,
        build_parser=_build_parser,
        run=_run,
    )


def fuse_main() -> None:
    run_mlx_lm_command("fuse", load=load, save=save)


if __name__ == "__main__":
    main()
