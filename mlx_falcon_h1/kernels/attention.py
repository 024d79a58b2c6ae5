"""Causal attention over many query tokens, fast on MLX's CPU backend.

Legend: B batch, Hq query heads, Hkv key/value heads (Hq = R * Hkv), Lq query
tokens, Lk key tokens (the cache's, then the new ones: the queries are the last
Lq positions), D head dim.

MLX's CPU `scaled_dot_product_attention` materialises the whole Lq x Lk score
matrix, masks it with a select, and runs a softmax whose exp costs ~11.5 ns per
element (see elementwise.py): at 2048 tokens of the 0.5B model that is ~0.6 s
per layer, more than all of the layer's matmuls. `causal_attention` computes
the same thing in blocks of query rows:
- each block only scores the keys it can see (the causal upper triangle is
  never computed: about half the work of a long prompt);
- the keys before the block need no mask; only the block's diagonal square is
  masked;
- exp(s - max) is one fused pass (elementwise.py's vectorized exp), and the
  softmax's row sums come out of the P @ [V | 1] matmul, so the big matrices are
  read by one max, one exp and the two matmuls, nothing else.

Exactly the softmax's math: masked keys contribute exp(-inf) = 0 in the
reference, and are left out here. Gradients are the reference's (MLX's SDPA).
"""

import mlx.core as mx

from . import with_reference_vjp
from .elementwise import _exp_ops, use_fused

# Scores held at once per block (elements): a block of queries is
# BLOCK_ELEMENTS / (Hq * Lk) rows, at least MIN_BLOCK. Small blocks waste less
# of the causal triangle and keep each temporary in the CPU's caches (the
# fused exp runs ~1.6 ns per element on 1 MB arrays, ~6 on 16 MB ones); big
# ones amortise per-op overhead. Measured (0.5B shape, 2048 queries): 32 rows
# best at 2K keys (119 ms; 64 rows: 158, 128: 163), 16-32 at 8K keys.
BLOCK_ELEMENTS = 1 << 19
MIN_BLOCK = 16
# From 2 to this many queries (short continuations, speculative decoding's
# checks) MLX's SDPA is as fast; one query (decode) takes _one_query.
MIN_QUERIES = 64

_exp_shifted = mx.compile(lambda s, m: _exp_ops(s - m))


def causal_attention_reference(q, k, v, scale, valid=None):
    """softmax(scale q k^T + causal mask) v, the queries being the last Lq keys.

    Args:
        q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D) with Lk >= Lq and Hkv | Hq.
        scale: the score scale (D^-0.5 for Falcon-H1).
        valid: only the first `valid` keys are real, or None (all are). For a
            KV cache's whole buffers: a view of their first keys would be copied
            by every matmul that reads it. An int, or for one query a (Lk,)
            boolean array of the real keys (a compiled decode step's, so it
            need not retrace per token).

    Returns:
        (B, Hq, Lq, D) in q's dtype.
    """
    if isinstance(valid, mx.array):  # the compiled decode step's: one query, every valid key
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=valid)
    if valid is not None:
        k, v = k[:, :, :valid], v[:, :, :valid]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")


def _blocked(q, k, v, scale):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    rep = hq // hkv
    offset = lk - lq  # query i sees keys 0 .. offset + i
    q = (q * scale).reshape(b, hkv, rep, lq, d)
    ones = mx.ones((b, hkv, lk, 1), dtype=v.dtype)
    v1 = mx.concatenate([v, ones], axis=-1)  # (B, Hkv, Lk, D+1): row sums from the matmul
    rows = max(MIN_BLOCK, BLOCK_ELEMENTS // (hq * lk))
    outs = []
    for i0 in range(0, lq, rows):
        i1 = min(i0 + rows, lq)
        n = i1 - i0
        # The R query heads of a K/V head as one matrix: one matmul per K/V head.
        qb = q[:, :, :, i0:i1].reshape(b, hkv, rep * n, d)
        split = offset + i0  # keys [0, split) are visible to every row of the block
        diag = qb @ k[:, :, split : offset + i1].swapaxes(-1, -2)  # (B, Hkv, R*n, n)
        causal = mx.arange(n)[:, None] >= mx.arange(n)[None]
        diag = mx.where(causal, diag.reshape(b, hkv, rep, n, n), -mx.inf)
        diag = diag.reshape(b, hkv, rep * n, n)
        m = diag.max(axis=-1, keepdims=True)
        if split > 0:
            past = qb @ k[:, :, :split].swapaxes(-1, -2)  # (B, Hkv, R*n, split)
            m = mx.maximum(m, past.max(axis=-1, keepdims=True))
            o = _exp_shifted(past, m) @ v1[:, :, :split]
            o = o + _exp_shifted(diag, m) @ v1[:, :, split : offset + i1]
        else:
            o = _exp_shifted(diag, m) @ v1[:, :, : offset + i1]
        outs.append((o[..., :d] / o[..., d:]).reshape(b, hkv, rep, n, d))
    out = outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=3)
    return out.reshape(b, hq, lq, d).astype(q.dtype)


def _one_query(q, k, v, scale, valid):
    # Decode: one query row per head sees every key, so no mask and no blocks.
    # MLX's SDPA spends most of its time in its slow exp at long contexts
    # (8192 keys, 0.5B shape: 1.6 ms per layer; this: 0.76, on whole buffers).
    b, hq, _, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    scores = (q * scale).reshape(b, hkv, hq // hkv, d) @ k.swapaxes(-1, -2)
    if isinstance(valid, mx.array):  # a mask of the real keys: the unused tail gets weight 0
        scores = mx.where(valid, scores, -mx.inf)
    elif valid is not None and valid < lk:
        scores = mx.where(mx.arange(lk) < valid, scores, -mx.inf)
    p = _exp_shifted(scores, scores.max(axis=-1, keepdims=True))
    out = (p @ v) / p.sum(axis=-1, keepdims=True)
    return out.reshape(b, hq, 1, d).astype(q.dtype)


def causal_attention(q, k, v, scale, valid=None):
    # docstring: causal_attention_reference's (assigned below)
    lq = q.shape[2]
    if valid is not None and lq > 1:  # only the one-query form reads whole buffers
        k, v, valid = k[:, :, :valid], v[:, :, :valid], None
    if not (use_fused(q, k, v) and (lq == 1 or lq >= MIN_QUERIES)):
        return causal_attention_reference(q, k, v, scale, valid)
    if lq == 1:
        fast = lambda q, k, v: (_one_query(q, k, v, scale, valid),)  # noqa: E731
    else:
        fast = lambda q, k, v: (_blocked(q, k, v, scale),)  # noqa: E731
    fn = with_reference_vjp(  # both return 1-tuples, as the helper expects
        fast, lambda q, k, v: (causal_attention_reference(q, k, v, scale, valid),)
    )
    return fn(q, k, v)[0]


causal_attention.__doc__ = causal_attention_reference.__doc__
