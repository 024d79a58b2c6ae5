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
  adapters.safetensors and restored by `load_adapters` (adapters.py; and the fuse).
- A --num-layers above the model's layer count (mlx-lm's default is 16; the
  shipped model has 4) trains every layer, with a line saying so, where mlx-lm
  would refuse after loading the model and the data. Likewise refused before
  the model loads, in one line: neither --train nor --test, and a --data folder
  that is missing or lacks the split a flag reads (mlx-lm: tracebacks).
- A fused model is saved so that our loader reloads it to the same logits:
  weights keep the base's folding state (a LoRA delta is added inside the
  Linear, before any multiplier), and config.json records that state under
  "mlx_falcon_h1" (see `save`); SSM parameters, conv and norms are stored in the
  base's layout (the loader widens them to float32).
"""

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm import lora as mlx_lm_lora
from mlx_lm import utils as mlx_lm_utils
from mlx_lm.cli_ui import rprint

from .adapters import linear_to_lora_layers, load_adapters
from .commands import run_mlx_lm_command
from .folder_format import FORMAT_KEY, record
from .loading import load as load_base
from .parameter_dtypes import is_ssm_parameter, layout_dtype

# --train-ssm: the Mamba2 parameters that are neither Linear nor conv.
SSM_PARAMETERS = ("mamba.A_log", "mamba.D", "mamba.dt_bias")


def load(path_or_hf_repo: str, adapter_path: Optional[str] = None, **kwargs):
    """mlx_falcon_h1.load, with adapters (and trained SSM parameters) applied."""
    out = load_base(path_or_hf_repo, fuse=False, **kwargs)  # training and saving: the plain layout
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

    The loader widened SSM parameters, conv and norms to float32; they are
    stored as the base's record says (float32 only if it chose that layout),
    else in the weights' dtype, so no consumer promotes (folder_format.py).
    """
    config = dict(config)
    if FORMAT_KEY not in config:
        config[FORMAT_KEY] = {"multipliers_folded": False, "source": str(src_path_or_repo)}
    params = dict(tree_flatten(model.parameters()))
    dtype = layout_dtype(params, record(config).get("ssm_dtype", "weights"))
    small = [(k, v.astype(dtype)) for k, v in params.items() if is_ssm_parameter(k, v)]
    model.update(tree_unflatten(small))
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
    _check_data(args)
    extra = list((args.lora_parameters or {}).get("trainable") or [])
    if getattr(args, "train_ssm", None):
        extra += [name for name in SSM_PARAMETERS if name not in extra]
    if extra:
        args.lora_parameters = {**args.lora_parameters, "trainable": extra}
    return mlx_lm_lora_run(args, training_callback)


def _check_data(args) -> None:
    """Refuse, before the model loads, what mlx-lm finds wrong only after (with a
    traceback): neither --train nor --test, a --data folder that is missing (mlx-lm
    then takes the name for a Hub dataset, which needs the datasets package; the
    default is data/) or without the split a flag reads."""
    if not args.train and not args.test:
        raise ValueError("nothing to do: add --train (fine-tune), --test (evaluate), or both")
    if getattr(args, "hf_dataset", None):  # the YAML config's Hub data
        return
    folder = Path(args.data)
    expected = "a folder with train.jsonl (and valid.jsonl, test.jsonl)"
    if folder.is_file():
        raise ValueError(f"--data {args.data}: a file; --data takes {expected}")
    if not folder.exists():
        if importlib.util.find_spec("datasets") is not None:
            return  # a Hub dataset: mlx-lm fetches it
        if args.data == mlx_lm_lora.CONFIG_DEFAULTS["data"]:
            raise ValueError(
                f"--data: mlx-lm's default is the Hugging Face dataset {args.data}, which needs "
                f"the datasets package (pip install datasets); or give --data {expected}"
            )
        raise ValueError(
            f"--data {args.data}: no such folder; give {expected}, or a Hugging Face dataset "
            "id with the datasets package installed (pip install datasets)"
        )
    for split in [s for s, wanted in (("train", args.train), ("test", args.test)) if wanted]:
        file = folder / f"{split}.jsonl"
        if not file.is_file() or file.stat().st_size == 0:
            raise ValueError(f"{file}: {'empty' if file.is_file() else 'missing'}; --{split} reads it")


def _train_model(args, model, *rest, **kwargs):
    """mlx-lm's train_model, with --num-layers capped at the model's layer count.

    mlx-lm's default (16) is more than a small Falcon-H1 has, and it refuses
    that; all layers is what such a request can only mean (-1 already says it).
    The cap is what adapter_config.json records, so the fuse and load_adapters
    rebuild the same layers."""
    layers = len(model.layers)
    if args.num_layers > layers:
        rprint(f"the model has {layers} layers: training all {layers} (--num-layers {args.num_layers})")
        args.num_layers = layers
    return mlx_lm_lora_train_model(args, model, *rest, **kwargs)


mlx_lm_lora_build_parser = mlx_lm_lora.build_parser
mlx_lm_lora_run = mlx_lm_lora.run
mlx_lm_lora_train_model = mlx_lm_lora.train_model


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
        train_model=_train_model,
    )


def fuse_main() -> None:
    run_mlx_lm_command("fuse", load=load, save=save)


if __name__ == "__main__":
    from .cli import run

    run(main)
