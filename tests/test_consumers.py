"""The consumer matrix: every MLX consumer of a converted folder computes the reference.

Each configuration is converted once (float32) and run by ours and by each
consumer of tests/consumers.py, against transformers' FalconH1ForCausalLM. Where
the converter says a consumer cannot express a configuration, the test checks
that it indeed cannot (its logits are off, or it refuses the folder): the
converter's warnings and the consumers' models are written from the same
sources independently, so each checks the other.
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import ODD_MUP, assert_close_logits, edit_config, make_checkpoint, reference_logits
from consumers import CONSUMERS, CannotLoad, mlx_swift_lm, stock_mlx_lm, widened
from mlx_falcon_h1 import folder_format, load_model
from mlx_falcon_h1_convert import convert, upgrade

IDS = np.random.default_rng(11).integers(0, 96, size=(2, 37))
DEFAULT_MODEL = Path(__file__).parents[1] / "mlx_falcon_h1" / "default_model"

BIASES = dict(attention_bias=True, mamba_proj_bias=True, projectors_bias=True, mlp_bias=True)

# Which consumers each converter warning speaks for.
SPOKEN_FOR = {
    "mlx-lm (installed)": folder_format.MLX_LM,
    "mlx-lm main d78bf58 / mlx-engine 08f0c07": folder_format.MLX_LM,
    "mlx-swift-lm 14414441": folder_format.MLX_SWIFT_LM,
}

CONFIGURATIONS = {
    "realistic_0.5B_mup": {},
    "odd_mup": ODD_MUP,
    "odd_mup_tied": dict(ODD_MUP, tie_word_embeddings=True),
    "odd_mup_all_biases": dict(ODD_MUP, **BIASES),
    "odd_mup_tied_biases_rms_norm": dict(
        ODD_MUP, tie_word_embeddings=True, mamba_rms_norm=True, **BIASES
    ),
    "odd_head_dim_20": dict(ODD_MUP, head_dim=20),
    "groups_2_no_norm": dict(ODD_MUP, mamba_n_groups=2),
    # Configurations a port cannot express: the converter must say which.
    "groups_2_rms_norm": dict(ODD_MUP, mamba_n_groups=2, mamba_rms_norm=True),
    "time_step_limit": dict(ODD_MUP, time_step_limit=(0.2, 0.5)),
    "rope_linear_scaling": dict(
        ODD_MUP, rope_theta=None, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)
    ),
}


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def relative_error(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module", params=list(CONFIGURATIONS))
def converted(request, tmp_path_factory):
    """(folder, transformers' logits, the converter's warnings per consumer)."""
    path = tmp_path_factory.mktemp(request.param)
    torch_model = make_checkpoint(path / "hf", **CONFIGURATIONS[request.param])
    convert(str(path / "hf"), str(path / "mlx"), dtype="float32")
    config = json.loads((path / "mlx" / "config.json").read_text())
    args = load_model(path / "mlx", lazy=True)[0].args
    return path / "mlx", reference_logits(torch_model, IDS), folder_format.consumer_caveats(args, config)


def test_ours(converted):
    folder, ref, _ = converted
    assert_close_logits(logits(load_model(folder)[0]), ref)


@pytest.mark.parametrize("consumer", list(CONSUMERS))
def test_consumer(converted, consumer):
    folder, ref, caveats = converted
    flagged = SPOKEN_FOR[consumer] in caveats
    try:
        out = logits(CONSUMERS[consumer](folder))
    except CannotLoad:
        assert flagged, f"{consumer} refuses a folder the converter did not warn about"
        return
    if flagged:  # the warning is true: this consumer misses the parity bar
        assert relative_error(out, ref) > 1e-4, f"{consumer} was flagged but matches"
    else:
        assert_close_logits(out, ref)


def test_config_states_only_what_is_left_to_apply(converted):
    folder, _, _ = converted
    config = json.loads((folder / "config.json").read_text())
    record = config[folder_format.FORMAT_KEY]
    assert record["format_version"] == folder_format.FORMAT_VERSION == 3
    assert set(record["multipliers"]) == set(ODD_MUP)
    for name in ("key_multiplier", "attention_in_multiplier", "ssm_out_multiplier"):
        assert config[name] == 1.0, name
    assert config["ssm_multipliers"] == [1.0] * 5 and config["mlp_multipliers"] == [1.0, 1.0]
    m = record["multipliers"]
    head = m["lm_head_multiplier"] / m["embedding_multiplier"] if config["tie_word_embeddings"] else 1.0
    assert config["lm_head_multiplier"] == pytest.approx(head, rel=1e-12)
    assert config["embedding_multiplier"] == 1.0


def test_converter_names_the_consumer(tmp_path, capsys):
    make_checkpoint(tmp_path / "hf", **CONFIGURATIONS["rope_linear_scaling"])
    convert(str(tmp_path / "hf"), str(tmp_path / "mlx"))
    out = capsys.readouterr().out
    assert f"[warning] {folder_format.MLX_SWIFT_LM}" in out and "rope_scaling" in out
    assert folder_format.MLX_LM not in out  # mlx-lm reads the rope_scaling object


def test_quantized_folders_mixed_recipe(tmp_path):
    """Quantized layers and per-layer bits as each consumer reads them: same logits as ours."""
    make_checkpoint(tmp_path / "hf", **ODD_MUP, **BIASES)
    convert(str(tmp_path / "hf"), str(tmp_path / "q"), quantize=True, dtype="float32",
            q_group_size=32, quant_predicate="falcon_mixed_3_6")  # fmt: skip
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert any(isinstance(v, dict) for v in config["quantization"].values())  # per-layer entries
    ours = logits(load_model(tmp_path / "q")[0])
    for name, consumer in CONSUMERS.items():
        assert_close_logits(logits(consumer(tmp_path / "q")), ours, rel=1e-5)


def test_swift_model_reproduces_its_behaviour_on_hugging_face_folders(tmp_path):
    """A check of the consumer model itself: on an unconverted folder mlx-swift-lm folds at
    load and scales keys at run time, which is right (its stated design)."""
    torch_model = make_checkpoint(tmp_path, **ODD_MUP)
    # transformers 5 writes the RoPE base under rope_parameters only; the released
    # configs (and Swift, which reads nothing else) have it at the top level.
    edit_config(tmp_path, rope_theta=1e11)
    assert_close_logits(logits(mlx_swift_lm(tmp_path)), reference_logits(torch_model, IDS))


def make_format_1(folder: Path) -> None:
    """What mlx-falcon-h1-convert 0.1.0 wrote: the same weights, the original
    multipliers restated in config.json, a format-1 record."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    record = config["mlx_falcon_h1"]
    config.update(record.pop("multipliers"))
    record["format_version"] = 1
    file.write_text(json.dumps(config, indent=4))


def digest(folder: Path) -> dict:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(folder.iterdir())
        if f.name != "config.json"
    }


@pytest.fixture
def format_1_folder(tmp_path):
    torch_model = make_checkpoint(tmp_path / "hf", **ODD_MUP, tie_word_embeddings=True)
    convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    make_format_1(tmp_path / "mlx")
    return tmp_path / "mlx", reference_logits(torch_model, IDS)


def test_upgrade_in_place(format_1_folder):
    folder, ref = format_1_folder
    # Format 1: right in ours (with a warning saying how to upgrade) and in mlx-lm,
    # wrong in mlx-swift-lm (the key multiplier twice): the bug this format fixes.
    with pytest.warns(UserWarning, match="--upgrade"):
        assert_close_logits(logits(load_model(folder)[0]), ref)
    assert_close_logits(logits(stock_mlx_lm(folder)), ref)
    assert relative_error(logits(mlx_swift_lm(folder)), ref) > 1e-2

    before = digest(folder)
    assert upgrade(str(folder)) is True
    assert digest(folder) == before  # weights and every other file untouched
    assert not [f for f in folder.iterdir() if f.name.startswith(".")]
    for consumer in CONSUMERS.values():
        assert_close_logits(logits(consumer(folder)), ref)
    assert_close_logits(logits(load_model(folder)[0]), ref)
    assert upgrade(str(folder)) is False  # already current


def test_upgrade_is_atomic(format_1_folder, monkeypatch):
    folder, _ = format_1_folder
    before = (folder / "config.json").read_bytes()

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        upgrade(str(folder))
    assert (folder / "config.json").read_bytes() == before
    assert not [f for f in folder.iterdir() if f.name.startswith(".")]


def test_upgrade_refuses_what_it_cannot_know(tmp_path):
    make_checkpoint(tmp_path / "hf")
    with pytest.raises(ValueError, match="no 'mlx_falcon_h1' record"):
        upgrade(str(tmp_path / "hf"))
    edit_config(tmp_path / "hf", mlx_falcon_h1={"multipliers_folded": False})
    with pytest.raises(ValueError, match="do not carry the multipliers"):
        upgrade(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="no such folder"):
        upgrade(str(tmp_path / "missing"))


def test_upgrade_command(format_1_folder):
    folder, _ = format_1_folder
    cmd = [sys.executable, "-m", "mlx_falcon_h1_convert", "--upgrade", str(folder)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "upgraded to format 3" in out
    assert not folder_format.needs_upgrade(json.loads((folder / "config.json").read_text()))


def test_shipped_model_is_current_and_the_same_everywhere():
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["mlx_falcon_h1"]["format_version"] == folder_format.FORMAT_VERSION
    assert config["mlx_falcon_h1"]["ssm_dtype"] == "weights"  # no app casts its weights
    ours = logits(load_model(DEFAULT_MODEL)[0])
    for consumer in CONSUMERS.values():  # in float32 where ours is: the same model
        assert_close_logits(logits(widened(consumer(DEFAULT_MODEL))), ours, rel=1e-5)
