"""One-token SSM state update (the decode step).

Legend: B batch, H SSM heads, P head dim, G groups, N state size.
"""

from typing import Tuple

import mlx.core as mx


def ssm_step_reference(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    state: mx.array,
) -> Tuple[mx.array, mx.array]:
    """Advance the SSM by one token; all arithmetic in float32.

        S <- exp(dt * A) * S + dt * x (outer) B ;  y = S @ C + D * x

    Args:
        x: (B, H, P) conv output for this token.
        dt: (B, H) float32 step size, already softplus'd and clipped.
        A: (H,) float32, negative.
        B: (B, G, N), C: (B, G, N); head h reads group h // (H / G).
        D: (H,) skip connection.
        state: (B, H, P, N) float32.

    Returns:
        y: (B, H, P) float32 and the new (B, H, P, N) float32 state.
    """
    batch, heads, head_dim = x.shape
    groups, n = B.shape[1], B.shape[2]
    x = x.astype(mx.float32)
    # (B, G, H/G, ...) views let one group's B and C serve all its heads.
    xg = x.reshape(batch, groups, heads // groups, head_dim, 1)
    Bg = B.astype(mx.float32)[:, :, None, None, :]  # (B, G, 1, 1, N)
    Cg = C.astype(mx.float32)[:, :, None, :, None]  # (B, G, 1, N, 1)
    dtg = dt.reshape(batch, groups, heads // groups, 1, 1)
    decay = mx.exp(dt * A).reshape(batch, groups, heads // groups, 1, 1)
    s = state.reshape(batch, groups, heads // groups, head_dim, n)
    s = decay * s + (dtg * xg) * Bg
    y = (s @ Cg)[..., 0].reshape(batch, heads, head_dim)
    return y + x * D.astype(mx.float32)[:, None], s.reshape(batch, heads, head_dim, n)
