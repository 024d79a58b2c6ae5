"""The CPU fast paths (fused exp / SiLU, blocked causal attention) against plain MLX ops.

On Linux these are what the model runs: the whole-model checks here use prompts
long enough for the blocked attention (>= MIN_QUERIES tokens), which the short
parity prompts in test_parity.py do not reach.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from conftest import assert_close_logits, make_checkpoint, reference_logits
from mlx_falcon_h1 import load_model
from mlx_falcon_h1.kernels import attention, elementwise


def rel(a, b):
    return float(mx.abs(a - b).max() / mx.abs(b).max())


def random_qkv(seed, q_shape, kv_shape):
    keys = mx.random.split(mx.random.key(seed), 3)
    return (mx.random.normal(q_shape, key=keys[0]), mx.random.normal(kv_shape, key=keys[1]),
            mx.random.normal(kv_shape, key=keys[2]))  # fmt: skip


def test_fast_paths_are_taken_here():
    assert elementwise.use_fused(mx.zeros(1)) == (mx.default_device() == mx.cpu)


def test_exp_matches_mlx_including_the_edges():
    x = mx.concatenate([-mx.abs(mx.random.normal((4096,), key=mx.random.key(0))) * 30,
                        mx.array([0.0, -1e-30, -87.0, -88.5, -100.0, -mx.inf, 5.0, 80.0])])
    ours, ref = elementwise.exp(x), mx.exp(x)
    assert float((mx.abs(ours - ref) / mx.maximum(ref, 1e-30)).max()) < 1e-5
    assert ours[-4].item() == 0.0 and ours[-3].item() == 0.0  # exp(-100), exp(-inf)
    g = mx.grad(lambda x: (elementwise.exp(x) * x).sum())(x[:4096])
    g_ref = mx.grad(lambda x: (mx.exp(x) * x).sum())(x[:4096])
    assert rel(g, g_ref) < 1e-6


def test_silu_and_gate_match_mlx_and_their_gradients():
    x = mx.random.normal((3, 37), key=mx.random.key(1)) * 20
    u = mx.random.normal((3, 37), key=mx.random.key(2))
    assert rel(elementwise.silu(x), nn.silu(x)) < 1e-6
    assert rel(elementwise.silu_gate(x, u), nn.silu(x) * u) < 1e-6
    for fn, ref in [(lambda x, u: elementwise.silu(x) * u, lambda x, u: nn.silu(x) * u),
                    (elementwise.silu_gate, lambda x, u: nn.silu(x) * u)]:  # fmt: skip
        grads = mx.grad(lambda x, u: (fn(x, u) ** 2).sum(), argnums=(0, 1))(x, u)
        refs = mx.grad(lambda x, u: (ref(x, u) ** 2).sum(), argnums=(0, 1))(x, u)
        assert all(rel(g, r) < 1e-5 for g, r in zip(grads, refs))


@pytest.mark.parametrize(
    "batch,hq,hkv,lq,lk,d",
    [(1, 8, 2, 2048, 2048, 64), (2, 4, 2, 200, 200, 24), (1, 4, 1, 130, 517, 16),
     (2, 6, 6, 64, 64, 8), (1, 4, 2, 300, 4300, 32)],
)  # fmt: skip
def test_blocked_attention_matches_sdpa(batch, hq, hkv, lq, lk, d):
    q, k, v = random_qkv(lq + lk, (batch, hq, lq, d), (batch, hkv, lk, d))
    k = k * 2
    ours = attention.causal_attention(q, k, v, d**-0.5)
    ref = attention.causal_attention_reference(q, k, v, d**-0.5)
    assert rel(ours, ref) < 1e-5


def test_blocked_attention_gradients_are_sdpa_s():
    q, k, v = random_qkv(7, (2, 4, 96, 16), (2, 2, 150, 16))

    def loss(fn):
        return mx.grad(lambda *a: (fn(*a, 0.25) ** 2).sum(), argnums=(0, 1, 2))(q, k, v)

    for g, r in zip(loss(attention.causal_attention), loss(attention.causal_attention_reference)):
        assert rel(g, r) < 1e-5


def test_one_query_attention_reads_only_the_valid_keys():
    """Decode attends over a KV cache's whole buffers; their tail must not count."""
    q, k, v = random_qkv(11, (2, 8, 1, 32), (2, 2, 300, 32))
    stale = mx.arange(300)[:, None] >= 257  # what a trim leaves behind: large, finite
    k, v = mx.where(stale, 1e3, k), mx.where(stale, -1e3, v)
    ours = attention.causal_attention(q, k, v, 32**-0.5, valid=257)
    ref = attention.causal_attention_reference(q, k[:, :, :257], v[:, :, :257], 32**-0.5)
    assert rel(ours, ref) < 1e-5
    whole = attention.causal_attention(q, k[:, :, :257], v[:, :, :257], 32**-0.5)
    assert rel(whole, ref) < 1e-5


@pytest.mark.parametrize("rows", [1, 3])
def test_decode_matvec_blocks_match_the_layer(rows, monkeypatch):
    """Decode's projections: row blocks on two streams, concatenated, = x @ W^T + b."""
    from mlx_falcon_h1 import blas
    from mlx_falcon_h1.linear import linear as _linear

    monkeypatch.setattr(blas, "optimized", lambda: True)  # taken with any BLAS
    layer = nn.Linear(700, 1900, bias=True)  # 2 MB blocks of 748 rows: three blocks
    x = mx.random.normal((1, rows, 700), key=mx.random.key(rows))
    assert rel(_linear(layer, x), layer(x)) < 1e-5


@pytest.fixture(scope="module")
def long_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("long")
    torch_model = make_checkpoint(path, mamba_n_groups=2, mamba_rms_norm=True)
    return torch_model, load_model(path)[0]


def test_long_prompt_matches_transformers(long_pair):
    torch_model, model = long_pair
    ids = np.random.default_rng(3).integers(0, 96, size=(2, 150))
    logits = model(mx.array(ids))
    assert_close_logits(np.array(logits), reference_logits(torch_model, ids))


def test_long_prompt_in_pieces_matches_one_call(long_pair):
    """Prefill pieces after the first attend to cached keys (blocked, offset > 0)."""
    _, model = long_pair
    ids = mx.array(np.random.default_rng(4).integers(0, 96, size=(1, 230)))
    whole = model(ids)
    cache = model.make_cache()
    pieces = [model(ids[:, a:b], cache=cache) for a, b in [(0, 100), (100, 180), (180, 181), (181, 230)]]
    assert_close_logits(np.array(mx.concatenate(pieces, axis=1)), np.array(whole), rel=1e-5)
