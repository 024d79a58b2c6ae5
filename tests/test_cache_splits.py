"""Any split of a sequence into cached calls gives the logits of one full call."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import assert_close_logits, make_checkpoint, reference_logits
from mlx_falcon_h1 import load_model

LENGTH = 45  # chunk size 16: splits below cross chunk boundaries at odd places

SPLITS = {
    "one_call": [45],
    "prefill_then_tokens": [20] + [1] * 25,
    "tokens_from_empty": [1] * 45,
    "multi_token_chunks": [7, 16, 22],
    "chunk_aligned": [16, 16, 13],
    "mixed": [1, 3, 1, 17, 1, 1, 21],
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}
    configs = {
        "realistic": {},
        "groups2_norm": dict(mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=False),
        "time_step_limit": dict(time_step_limit=[0.05, 0.9], mamba_conv_bias=False),
        # Biases on every projection: decode's mat-vec form adds them itself.
        "all_biases": dict(attention_bias=True, mlp_bias=True, projectors_bias=True,
                           mamba_proj_bias=True),
    }
    for name, overrides in configs.items():
        path = tmp_path_factory.mktemp(name)
        made[name] = (make_checkpoint(path, **overrides), load_model(path)[0])
    return made


def run_split(model, ids: np.ndarray, pieces) -> np.ndarray:
    assert sum(pieces) == ids.shape[1]
    cache = model.make_cache()
    out, start = [], 0
    for n in pieces:
        logits = model(mx.array(ids[:, start : start + n]), cache=cache)
        mx.eval(logits, [c.state for c in cache])
        out.append(np.array(logits))
        start += n
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("config", ["realistic", "groups2_norm", "time_step_limit", "all_biases"])
@pytest.mark.parametrize("split", list(SPLITS))
def test_split_matches_full_call(models, config, split, rng):
    torch_model, model = models[config]
    ids = rng.integers(0, 96, size=(2, LENGTH))
    full = np.array(model(mx.array(ids)))
    pieces = run_split(model, ids, SPLITS[split])
    assert_close_logits(pieces, full)
    # ...and through it, transformers (its own cache only does prefill + 1-token steps).
    assert_close_logits(pieces, reference_logits(torch_model, ids))


def test_cache_carries_state(models, rng):
    """A continuation without the cache must differ: the test above is not vacuous."""
    _, model = models["realistic"]
    ids = rng.integers(0, 96, size=(1, 30))
    full = np.array(model(mx.array(ids)))
    cold = np.array(model(mx.array(ids[:, 20:])))
    assert np.abs(cold - full[:, 20:]).max() > 1e-3 * np.abs(full).max()


def test_ssm_state_is_float32(tmp_path):
    make_checkpoint(tmp_path)
    model, _ = load_model(tmp_path)
    model.set_dtype(mx.bfloat16)
    cache = model.make_cache()
    logits = model(mx.array([[1, 2, 3, 4, 5]]), cache=cache)
    logits = model(mx.array([[6]]), cache=cache)
    assert logits.dtype == mx.bfloat16
    assert all(c.ssm_state.dtype == mx.float32 for c in cache)
    assert cache[0].ssm_state.shape == (1, 6, 16, 8)  # (B, H, P, N)
    assert cache[0].conv_state.shape == (1, 3, 96 + 2 * 8)  # (B, K-1, conv_dim)
