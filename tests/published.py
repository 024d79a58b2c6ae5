"""Falcon-H1 MLX folders as other tools made them, and how far each reader is from transformers.

The folders are built the way their makers built them, from the trained
fixture or a small random checkpoint:
- "mlx-lm": the installed mlx-lm's own `mlx_lm.convert` (0.32.2 here). The
  releases 0.28.1 and 0.30.4 write bit-identical tensors: the committed
  manifest (tests/fixtures/published/manifest.json, written by
  tests/helpers/make_published_fixtures.py from venvs of those releases) holds
  their tensor hashes, and tests compare every build with it.
- "unfolded": mlx-lm PR #231's branch, which no registry has: the same
  converter with its sanitize reduced to what the branch did (transpose conv1d,
  fold nothing) and the quantization entry as an mlx-lm before 0.27 wrote it
  (no "mode"). A re-implementation from the facts in
  mlx_falcon_h1/foreign_folders.py, not a copy of the branch.
"""

import hashlib
import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_falcon_h1_hf"
MANIFEST = Path(__file__).parent / "fixtures" / "published" / "manifest.json"

# Random checkpoints that exercise what the trained fixture does not (its
# attention_in is 1, untied, one group): name -> make_checkpoint overrides.
RANDOM_CASES = {
    "attention_in": dict(attention_in_multiplier=0.7, key_multiplier=0.43, embedding_multiplier=3.1),
    "tied": dict(tie_word_embeddings=True),
    "groups2_rms_norm": dict(mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=False),
}
# Our converter's folder layouts, as convert() keyword arguments, for
# examples/consumer_layouts_table.py: the default (every parameter in the
# weights' dtype) and --ssm-dtype float32 (SSM parameters, conv1d and norms kept float32).
DEFAULT_LAYOUT = {}
FLOAT32_LAYOUT = dict(ssm_dtype="float32")

# The releases that can convert each case (0.28.1-0.30.2 cannot convert a tied checkpoint).
RELEASES = ("0.28.1", "0.30.4", "0.32.2")
TIED_RELEASES = ("0.30.4", "0.32.2")


# config.json fields that only name the software installed when a folder was
# written, never a choice its maker made: transformers' save_pretrained stamps
# its own version into every config it saves and mlx-lm copies the source's
# config through. The manifest check leaves them out, so a dependency release
# that only moves a stamp cannot fail it.
VERSION_STAMPS = frozenset({"transformers_version"})


def config_changes(source: dict, written: dict) -> dict:
    """What a converter decided about config.json: the keys it set (added or
    changed) and removed, against the Hugging Face config it read. The rest is
    copied through, in whatever form the transformers that saved the source
    chose (rope_theta or rope_parameters, torch_dtype or dtype), so it is not
    the converter's to be compared on."""
    return {
        "set": {k: v for k, v in sorted(written.items()) if k not in VERSION_STAMPS and source.get(k, ...) != v},
        "removed": sorted(k for k in source if k not in written and k not in VERSION_STAMPS),
    }


def manifest_mismatches(entry: dict, hashes: dict, changes: dict, installed: str) -> list:
    """How a folder that mlx-lm `installed` wrote (its tensor hashes and its
    config_changes) differs from what each release in a manifest entry wrote:
    one line per difference, naming both versions; [] when it is the published kind."""
    out = []
    for release, written in entry["releases"].items():
        recorded = entry["tensors"][written["tensors"]]
        for name in sorted(recorded.keys() | hashes.keys()):
            if recorded.get(name) != hashes.get(name):
                what = "missing" if name not in hashes else "extra" if name not in recorded else "other values"
                out.append(f"mlx-lm {installed} writes tensor {name} unlike {release} ({what})")
        mine, theirs = changes["set"], written["config_changes"]["set"]
        for key in sorted(mine.keys() | theirs.keys()):
            if mine.get(key, "<unset>") != theirs.get(key, "<unset>"):
                out.append(f"mlx-lm {installed} sets config.json {key}={mine.get(key, '<unset>')!r}, "
                           f"{release} set {theirs.get(key, '<unset>')!r}")  # fmt: skip
        for key in sorted(set(changes["removed"]) ^ set(written["config_changes"]["removed"])):
            out.append(f"mlx-lm {installed} and {release} differ in removing config.json {key}")
    return out


def bf16_checkpoint(path: Path, **overrides) -> Path:
    """A random Falcon-H1 (conftest.TINY, seed 0) saved in bfloat16, as TII's are,
    with a small tokenizer."""
    import torch
    from conftest import make_checkpoint, make_tokenizer

    if (path / "config.json").exists():
        return path
    model = make_checkpoint(path, **overrides)
    model.to(torch.bfloat16).save_pretrained(path)
    make_tokenizer(path)
    return path


@contextmanager
def _branch_sanitize():
    """mlx-lm's falcon_h1 with the pre-release branch's sanitize: conv1d transposed, nothing folded."""
    from mlx_lm.models import falcon_h1

    released = falcon_h1.Model.sanitize

    def sanitize(self, weights):
        return {
            k: (w.transpose(0, 2, 1) if "conv1d.weight" in k and w.shape[-1] > w.shape[1] else w)
            for k, w in weights.items()
        }

    falcon_h1.Model.sanitize = sanitize
    try:
        yield
    finally:
        falcon_h1.Model.sanitize = released


def make_folder(source: Path, out: Path, maker: str, bits: Optional[int] = None) -> Path:
    """`source` (a Hugging Face folder) converted as `maker` ("mlx-lm" or "unfolded") did."""
    import mlx_lm

    if out.exists():
        return out
    kwargs = dict(quantize=bits is not None, q_bits=bits, q_group_size=64)
    if maker == "mlx-lm":
        mlx_lm.convert(str(source), str(out), **kwargs)
        return out
    assert maker == "unfolded", maker
    with _branch_sanitize():
        mlx_lm.convert(str(source), str(out), **kwargs)
    file = out / "config.json"
    config = json.loads(file.read_text())
    for key in ("quantization", "quantization_config"):
        if key in config:
            config[key].pop("mode", None)
    file.write_text(json.dumps(config, indent=4))
    return out


def our_folder(source: Path, out: Path, layout: dict, bits: Optional[int] = None, **calibration) -> Path:
    """`source` converted by our converter in `layout` (DEFAULT_LAYOUT, ...), at
    bfloat16 or `bits` (group size 64, as make_folder's), with a calibrated
    method if `calibration` names one (convert's method=, num_samples= ...)."""
    from mlx_falcon_h1_convert import convert

    if out.exists():
        return out
    kwargs = dict(quantize=True, q_bits=bits, q_group_size=64) if bits else {}
    convert(str(source), str(out), report_tokens=16, **layout, **kwargs, **calibration)
    return out


def tensor_hashes(folder: Path) -> dict:
    """{tensor name: sha256 of its bytes (bfloat16 as float32)} of a folder's safetensors."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, w in mx.load(str(file)).items():
            a = np.array(w.astype(mx.float32) if w.dtype == mx.bfloat16 else w)
            out[name] = f"{a.dtype}:{hashlib.sha256(a.tobytes()).hexdigest()[:20]}"
    return dict(sorted(out.items()))


def floating_tensors(folder: Path) -> dict:
    """{tensor name: tensor} of a folder's floating-point tensors (read lazily)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update({k: w for k, w in mx.load(str(file)).items() if mx.issubdtype(w.dtype, mx.floating)})
    return out


def copy_folder(folder: Path, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(folder, dest)
    return dest


def mean_kl(model: Callable, reference: Callable, ids: np.ndarray, seq_len: int = 256) -> float:
    """Mean KL(reference || model) of next-token distributions over `ids`, nats."""
    from mlx_falcon_h1.evaluate import compare

    return compare(model, reference, ids, seq_len=seq_len, batch_size=4)["kl"]


def heldout_ids(count: int) -> np.ndarray:
    from mlx_lm.utils import load_tokenizer

    from mlx_falcon_h1.evaluate import default_text_path, load_tokens

    return load_tokens(load_tokenizer(FIXTURE), default_text_path().read_text(encoding="utf-8"), count)


def ours(folder: Path, **kw):
    from mlx_falcon_h1 import load_model

    return load_model(str(folder), **kw)[0]


def digest(hashes: dict) -> str:
    """One hash of a folder's tensor hashes."""
    return hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()[:20]
