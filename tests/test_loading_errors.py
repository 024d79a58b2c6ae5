"""Bad input gets an error naming the file, tensor or field at fault."""

import json

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import edit_config, make_checkpoint
from mlx_falcon_h1 import CheckpointError, ConfigError, load, load_model

CONV = "model.layers.0.mamba.conv1d.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    make_checkpoint(path)
    return path


@pytest.fixture
def ckpt(good, tmp_path):
    """A fresh copy of a valid checkpoint to break."""
    for f in good.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    return tmp_path


def rewrite_weights(path, change):
    file = path / "model.safetensors"
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def test_valid_checkpoint_loads(ckpt):
    model, config = load_model(ckpt)
    assert config["model_type"] == "falcon_h1"
    assert model(mx.array([[1, 2, 3]])).shape == (1, 3, 96)


def test_not_falcon_h1(ckpt):
    edit_config(ckpt, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config\.json.*model_type is 'llama'"):
        load_model(ckpt)


@pytest.mark.parametrize(
    "changes, pattern",
    [
        (dict(mamba_n_heads=5, mamba_d_head="auto"), r"mamba_n_heads = 5 does not divide mamba_d_ssm = 96"),
        (dict(mamba_n_heads=5), r"mamba_d_head x mamba_n_heads = 16 x 5 != mamba_d_ssm = 96"),
        (dict(mamba_d_head=20), r"mamba_d_head x mamba_n_heads = 20 x 6 != mamba_d_ssm = 96"),
        (dict(num_key_value_heads=3), r"num_key_value_heads = 3 does not divide num_attention_heads = 4"),
        (dict(mamba_n_groups=4), r"mamba_n_groups = 4 does not divide mamba_n_heads = 6"),
        (dict(ssm_multipliers=[1.0, 1.0]), r"ssm_multipliers has 2 values, expected 5"),
        (dict(hidden_act="gelu"), r"hidden_act is 'gelu'"),
        (dict(head_dim=23), r"head_dim = 23 must be even"),
        (dict(rope_theta=5.0), r"rope_theta = 5.0 disagrees with rope_parameters.rope_theta"),
        (dict(mamba_n_heads="six"), r"config\.json: a field has the wrong type"),
    ],
)
def test_inconsistent_config(ckpt, changes, pattern):
    edit_config(ckpt, **changes)
    with pytest.raises(ConfigError, match=pattern) as info:
        load_model(ckpt)
    assert str(ckpt / "config.json") in str(info.value)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_model(ckpt)


def test_unparsable_config(ckpt):
    (ckpt / "config.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable"):
        load_model(ckpt)


def test_missing_tensor(ckpt):
    rewrite_weights(ckpt, lambda t: t.pop("model.layers.1.mamba.A_log"))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model\.layers\.1\.mamba\.A_log"):
        load_model(ckpt)


def test_extra_tensor(ckpt):
    rewrite_weights(ckpt, lambda t: t.update({"model.layers.0.mamba.bogus": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor\(s\) model\.layers\.0\.mamba\.bogus"):
        load_model(ckpt)


def test_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"
    rewrite_weights(ckpt, lambda t: t.update({name: np.zeros((40, 64), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \(40, 64\), the config needs \(48, 64\)"):
        load_model(ckpt)


def test_no_weight_files(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors weight files"):
        load_model(ckpt)


def test_shard_listed_in_index_but_missing(tmp_path):
    make_checkpoint(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"{shard}: listed in model\.safetensors\.index\.json but missing"):
        load_model(tmp_path)


def test_truncated_weight_file(ckpt):
    file = ckpt / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(ckpt)


def test_garbage_weight_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(ckpt)


def test_folder_converted_by_another_tool_is_refused(ckpt):
    """mlx-lm's converter folds some multipliers and keeps them in the config:
    running that folder would apply them twice, so it is refused."""
    rewrite_weights(ckpt, lambda t: t.update({CONV: np.ascontiguousarray(t[CONV].transpose(0, 2, 1))}))
    with pytest.raises(CheckpointError, match=r"converted by another tool"):
        load_model(ckpt)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"no such folder"):
        load_model(tmp_path / "nope")


def test_load_without_tokenizer(ckpt):
    with pytest.raises(CheckpointError, match=r"no tokenizer files"):
        load(ckpt)
