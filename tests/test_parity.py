"""Logits parity with transformers' FalconH1ForCausalLM, float32, whole network (cache=None)."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import ODD_MUP, assert_close_logits, edit_config, make_checkpoint, reference_logits
from mlx_falcon_h1 import load_model

CONFIGS = {
    # 0.5B multipliers, plain gate (mamba_rms_norm false), rope base 1e11.
    "realistic_0.5B": {},
    "odd_multipliers": ODD_MUP,
    "groups2_norm_after_gate": dict(
        mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=False, **ODD_MUP
    ),
    "groups2_norm_before_gate": dict(
        mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=True
    ),
    "groups3_no_norm": dict(mamba_n_groups=3, mamba_d_state=4),
    # mamba_d_ssm null: d_ssm = mamba_expand * hidden = 128, d_head auto = 128 / 8.
    "d_ssm_from_expand": dict(mamba_d_ssm=None, mamba_expand=2, mamba_n_heads=8),
    "explicit_d_head": dict(mamba_d_ssm=96, mamba_n_heads=3, mamba_d_head=32),
    "all_biases": dict(
        attention_bias=True,
        mlp_bias=True,
        projectors_bias=True,
        mamba_proj_bias=True,
        mamba_conv_bias=True,
        mamba_rms_norm=True,
    ),
    "no_conv_bias": dict(mamba_conv_bias=False),
    "tied_embeddings": dict(tie_word_embeddings=True, **ODD_MUP),
    "time_step_limit": dict(time_step_limit=[0.05, 0.9]),
    "mqa_one_kv_head": dict(num_key_value_heads=1),
    "rope_linear": dict(
        rope_theta=None, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)
    ),
    "rope_llama3": dict(
        rope_theta=None,
        max_position_embeddings=512,
        rope_parameters=dict(
            rope_type="llama3",
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
            rope_theta=5e5,
        ),
    ),
    "rope_yarn": dict(
        rope_theta=None,
        max_position_embeddings=256,
        rope_parameters=dict(
            rope_type="yarn", factor=4.0, original_max_position_embeddings=64, rope_theta=1e4
        ),
    ),
}

# 1 token; shorter than a chunk (16); exact multiple; several chunks + remainder.
LENGTHS = [1, 7, 32, 45]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            torch_model = make_checkpoint(path, **CONFIGS[name])
            made[name] = (torch_model, load_model(path)[0])
        return made[name]

    return get


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(checkpoints, name, rng):
    torch_model, model = checkpoints(name)
    vocab = torch_model.config.vocab_size
    for length in LENGTHS:
        ids = rng.integers(0, vocab, size=(2, length))
        ours = np.array(model(mx.array(ids)))
        assert_close_logits(ours, reference_logits(torch_model, ids))


def test_rope_theta_read_from_either_key(tmp_path, rng):
    """transformers < 5 writes top-level rope_theta; 5 writes rope_parameters."""
    torch_model = make_checkpoint(tmp_path, rope_theta=1e11)
    edit_config(tmp_path, rope_parameters=None, rope_theta=1e11)
    ids = rng.integers(0, 96, size=(2, 45))
    ours = np.array(load_model(tmp_path)[0](mx.array(ids)))
    assert_close_logits(ours, reference_logits(torch_model, ids))


def test_legacy_rope_scaling_key(tmp_path, rng):
    torch_model = make_checkpoint(
        tmp_path, rope_theta=None, rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)
    )
    edit_config(tmp_path, rope_parameters=None, rope_theta=1e4, rope_scaling=dict(type="linear", factor=2.0))
    ids = rng.integers(0, 96, size=(1, 40))
    ours = np.array(load_model(tmp_path)[0](mx.array(ids)))
    assert_close_logits(ours, reference_logits(torch_model, ids))


def test_rope_base_matters(tmp_path, rng):
    """Guard against a test setup that cannot see the RoPE base at all."""
    torch_model = make_checkpoint(tmp_path, rope_theta=1e4)
    edit_config(tmp_path, rope_parameters=None, rope_theta=1e11)
    ids = rng.integers(0, 96, size=(1, 45))
    ours = np.array(load_model(tmp_path)[0](mx.array(ids)))
    ref = reference_logits(torch_model, ids)
    assert np.abs(ours - ref).max() > 1e-3 * np.abs(ref).max()


def test_missing_head_dim_means_hidden_over_heads(tmp_path, rng):
    torch_model = make_checkpoint(tmp_path, head_dim=16)  # 64 / 4 heads
    edit_config(tmp_path, head_dim=None)
    ids = rng.integers(0, 96, size=(2, 20))
    ours = np.array(load_model(tmp_path)[0](mx.array(ids)))
    assert_close_logits(ours, reference_logits(torch_model, ids))


def test_sharded_checkpoint(tmp_path, rng):
    torch_model = make_checkpoint(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = rng.integers(0, 96, size=(2, 20))
    ours = np.array(load_model(tmp_path)[0](mx.array(ids)))
    assert_close_logits(ours, reference_logits(torch_model, ids))


def test_realistic_multipliers_matter(tmp_path, rng):
    """The 0.5B multipliers move the logits far beyond the tolerance, so the
    parity tests above really check them."""
    torch_model = make_checkpoint(tmp_path)
    edit_config(tmp_path, key_multiplier=1.0)
    ids = rng.integers(0, 96, size=(1, 45))
    ours = np.array(load_model(tmp_path)[0](mx.array(ids)))
    ref = reference_logits(torch_model, ids)
    assert np.abs(ours - ref).max() > 1e-2 * np.abs(ref).max()
