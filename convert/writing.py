"""Writing the output folder: safetensors shards, config.json spelled out for
every reader, the tokenizer files, the model card; into a temporary folder that
replaces the destination in one rename, so a failed conversion leaves nothing.
And rewriting a folder's shards in place, for --upgrade."""

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import mlx.core as mx
from tqdm import tqdm

from mlx_falcon_h1.folder_format import FORMAT_KEY
from mlx_falcon_h1.foreign_folders import safetensors_metadata
from mlx_falcon_h1.loading import weight_files
from mlx_falcon_h1.model import ModelArgs

MAX_SHARD_BYTES = 5 << 30  # mlx-lm's shard size
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


def resolved_config(config: Dict[str, Any], args: ModelArgs) -> Dict[str, Any]:
    """`config` with every field spelled out as resolved: mlx-lm's and
    mlx-swift-lm's defaults differ from transformers' (tie_word_embeddings,
    mamba_norm_before_gate, head_dim ...) and both read the RoPE base from
    rope_theta only."""
    config = dict(config)
    for f in dataclasses.fields(ModelArgs):
        if f.name != FORMAT_KEY:
            value = getattr(args, f.name)
            config[f.name] = list(value) if isinstance(value, tuple) else value
    config["rope_theta"] = args.rope_base
    if args.rope_scaling_config is not None:
        config["rope_scaling"] = args.rope_scaling_config
    return config


def write_folder(folder: Path, source: Path, params: Dict[str, mx.array], config: Dict[str, Any],
                 max_shard_bytes: int, remote_code: bool) -> None:  # fmt: skip
    """The weights (`params` is emptied as they are written), the source's
    tokenizer files, with `remote_code` our model file, and config.json."""
    write_weights(folder, params, max_shard_bytes)
    for name in EXTRA_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
    if remote_code:
        (folder / REMOTE_CODE_FILE).write_text(REMOTE_CODE)
        config = {**config, "model_file": REMOTE_CODE_FILE}
    write_config_file(folder / "config.json", config)


def write_weights(folder: Path, params: Dict[str, mx.array], max_shard_bytes: int) -> None:
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


def write_config_file(file: Path, config: dict) -> None:
    from mlx_lm.utils import save_config  # encodes inf as mlx-lm and transformers 5 read it

    save_config(dict(config), file)


# The model card's line on the SSM parameters' layout (folder_format.SSM_DTYPES);
# --upgrade replaces it (and format 2's) in a card this converter wrote.
LAYOUT_LINES = {
    "weights": "A_log, D, dt_bias, conv1d and norms share the weights' dtype: no app casts weights.",
    "float32": "A_log, D, dt_bias, conv1d and norms are float32: other apps cast weights every token.",
}
OLD_LAYOUT_LINE = "A_log, D, dt_bias, conv1d and norms are kept in float32."  # formats 1 and 2


def card_with_layout(card: str, ssm_dtype: str) -> str:
    """A model card this converter wrote, its layout lines saying `ssm_dtype`."""
    lines = card.split("\n")
    for i, line in enumerate(lines):
        if line == OLD_LAYOUT_LINE or line in LAYOUT_LINES.values():
            lines[i] = LAYOUT_LINES[ssm_dtype]
        elif line.startswith("- ssm_dtype: `"):
            lines[i] = f"- ssm_dtype: `{ssm_dtype}`"
    return "\n".join(lines)


def model_card(source: str, settings: dict, report: Optional[dict]) -> str:
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
        LAYOUT_LINES[settings["ssm_dtype"]],
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


def replace_file(file: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary name beside `file`, then moved over it in one
    rename: `file` is always whole, old or new. The name ends unlike a weight
    file, so a folder's *.safetensors never includes one left by a crash."""
    tmp = file.with_name(f".{file.name}.upgrade-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def recast_in_place(folder: Path, casts: Dict[str, mx.Dtype]) -> None:
    """Each shard of `folder` that holds a tensor of `casts` ({name: dtype})
    rewritten with it cast, one shard at a time (replace_file). An interruption
    leaves every shard whole, old or new, in a folder that loads and computes the
    same in our runtime (which widens these tensors) and that --upgrade finishes;
    the disk needs room for one more shard, not a copy of the folder. The
    index's total_size follows."""
    total = 0
    for file in weight_files(folder):
        shard = mx.load(str(file))
        if casts.keys() & shard.keys():
            shard = {k: w.astype(casts[k]) if k in casts else w for k, w in shard.items()}
            metadata = safetensors_metadata(file)

            def write(tmp, shard=shard):
                with open(tmp, "wb") as f:  # a path would get ".safetensors" appended
                    mx.save_safetensors(f, shard, metadata=metadata)

            replace_file(file, write)
        total += sum(w.nbytes for w in shard.values())
        del shard
    index_file = folder / "model.safetensors.index.json"
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        index.setdefault("metadata", {})["total_size"] = total
        replace_file(index_file, lambda tmp: tmp.write_text(json.dumps(index, indent=4)))


def prepare_destination(mlx_path: Path, force: bool) -> Path:
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


def move_into_place(tmp: Path, mlx_path: Path) -> None:
    old = None
    if mlx_path.exists():  # only reached with --force
        old = mlx_path.with_name(f".{mlx_path.name}.replaced-{os.getpid()}")
        mlx_path.rename(old)
    tmp.rename(mlx_path)
    if old is not None:
        shutil.rmtree(old) if old.is_dir() else old.unlink()
