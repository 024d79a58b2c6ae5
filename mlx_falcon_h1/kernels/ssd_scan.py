"""Chunked SSD scan: the Mamba2 recurrence over a whole prompt chunk.

Legend: B batch, L tokens, H SSM heads, P head dim, G groups, N state size,
Q chunk length, c number of chunks. Head h reads group h // (H / G).

The recurrence, per head (state S is P x N):
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t @ C_t + D * x_t
The chunked ("state space duality") form computes the same thing with matmuls:
inside each chunk of Q tokens the output is a masked, decayed attention-like
product; between chunks only the P x N state is carried. Memory is linear in L
(the Q x Q decay blocks are B*H*L*Q floats); nothing loops over tokens or chunks
in Python. Follows Listing 1 of Dao & Gu 2024 ("Transformers are SSMs") and the
segment-sum of transformers' modeling_falcon_h1.py.
"""

from typing import Optional, Tuple

import mlx.core as mx


def _segment_sum(a: mx.array) -> mx.array:
    """(..., T) -> (..., T, T) with out[i, j] = sum(a[j+1 : i+1]) for i >= j, else -inf.

    Built by a masked cumulative sum instead of cumsum(a)[i] - cumsum(a)[j]:
    the difference of two large cumulative sums loses the small segments' digits
    in float32, and exp() of the segment is what the output multiplies by.
    """
    t = a.shape[-1]
    rows = mx.arange(t)[:, None]
    cols = mx.arange(t)[None]
    terms = mx.where(rows > cols, a[..., :, None], 0.0)  # [i, j] = a[i] for i > j
    sums = mx.cumsum(terms, axis=-2)
    return mx.where(rows >= cols, sums, -mx.inf)


def ssd_scan_reference(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    state: Optional[mx.array],
    chunk_size: int,
) -> Tuple[mx.array, mx.array]:
    """Run the SSM over L tokens from `state`; all arithmetic in float32.

    Args:
        x: (B, L, H, P) conv outputs for the SSM input.
        dt: (B, L, H) float32 step sizes, already softplus'd and clipped.
        A: (H,) float32, negative (-exp(A_log)).
        B: (B, L, G, N) input projection of the state.
        C: (B, L, G, N) output projection of the state.
        D: (H,) skip connection.
        state: (B, H, P, N) float32 state before the first token, or None (zeros).
        chunk_size: Q, tokens per chunk.

    Returns:
        y: (B, L, H, P) float32.
        state: (B, H, P, N) float32 state after the last token.
    """
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    per_group = heads // groups
    q = chunk_size
    pad = -length % q
    chunks = (length + pad) // q

    x = x.astype(mx.float32)
    B = B.astype(mx.float32)
    C = C.astype(mx.float32)
    skip = x * D.astype(mx.float32)[:, None]
    # Padded steps have dt = 0: no decay and no input, so they leave the state
    # exactly as it was and only produce outputs that are cut off below.
    if pad:
        widths = [(0, 0), (0, pad)]
        x = mx.pad(x, widths + [(0, 0), (0, 0)])
        dt = mx.pad(dt, widths + [(0, 0)])
        B = mx.pad(B, widths + [(0, 0), (0, 0)])
        C = mx.pad(C, widths + [(0, 0), (0, 0)])

    # Split heads into (group, head-in-group) so B and C broadcast without copies.
    xdt = (x * dt[..., None]).reshape(batch, chunks, q, groups, per_group, head_dim)
    xdt = xdt.transpose(0, 1, 3, 4, 2, 5)  # (B, c, G, H/G, Q, P)
    B = B.reshape(batch, chunks, q, groups, n).transpose(0, 1, 3, 2, 4)[:, :, :, None]
    C = C.reshape(batch, chunks, q, groups, n).transpose(0, 1, 3, 2, 4)[:, :, :, None]
    # B, C: (B, c, G, 1, Q, N)
    dA = (dt * A).reshape(batch, chunks, q, groups, per_group)
    dA = dA.transpose(0, 1, 3, 4, 2)  # (B, c, G, H/G, Q)
    dA_cumsum = mx.cumsum(dA, axis=-1)

    # 1. Within each chunk: y_t += sum_{s<=t} (C_t . B_s) exp(sum dA(s, t]) dt_s x_s
    decay = mx.exp(_segment_sum(dA))  # (B, c, G, H/G, Q, Q)
    scores = (C @ B.swapaxes(-1, -2)) * decay
    y = scores @ xdt  # (B, c, G, H/G, Q, P)

    # 2. Each chunk's own contribution to the state at its end.
    decay_to_end = mx.exp(dA_cumsum[..., -1:] - dA_cumsum)[..., None]  # (..., Q, 1)
    chunk_states = xdt.swapaxes(-1, -2) @ (B * decay_to_end)  # (B, c, G, H/G, P, N)

    # 3. Carry states across chunks: the state entering chunk z is
    #    sum_{j<=z} exp(decay of chunks j..z-1) * (state made by chunk j-1).
    if state is None:
        state = mx.zeros((batch, heads, head_dim, n), dtype=mx.float32)
    initial = state.astype(mx.float32).reshape(batch, 1, groups, per_group, head_dim, n)
    chunk_states = mx.concatenate([initial, chunk_states], axis=1)  # (B, c+1, ...)
    chunk_decay = dA_cumsum[..., -1].transpose(0, 2, 3, 1)  # (B, G, H/G, c)
    chunk_decay = mx.pad(chunk_decay, [(0, 0), (0, 0), (0, 0), (1, 0)])
    carry = mx.exp(_segment_sum(chunk_decay))  # (B, G, H/G, c+1, c+1)
    flat = chunk_states.transpose(0, 2, 3, 1, 4, 5).reshape(
        batch, groups, per_group, chunks + 1, head_dim * n
    )
    entering = (carry @ flat).reshape(batch, groups, per_group, chunks + 1, head_dim, n)
    final_state = entering[:, :, :, -1].reshape(batch, heads, head_dim, n)
    entering = entering[:, :, :, :-1].transpose(0, 3, 1, 2, 4, 5)  # (B, c, G, H/G, P, N)

    # 4. Output from the state entering each chunk, decayed to each position.
    y = y + (C @ entering.swapaxes(-1, -2)) * mx.exp(dA_cumsum)[..., None]

    y = y.transpose(0, 1, 4, 2, 3, 5).reshape(batch, chunks * q, heads, head_dim)
    return y[:, :length] + skip, final_state
