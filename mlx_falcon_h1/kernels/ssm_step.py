"""The decode step: one token through conv, SiLU, dt and the SSM state update.

Legend: B batch, H SSM heads, P head dim, G groups, N state size, K conv width,
C conv channels (H*P + 2*G*N).
"""

from typing import Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from .conv1d import causal_conv1d_reference


def discretize(
    dt: mx.array, dt_bias: mx.array, A_log: mx.array, time_step_limit: Sequence[float]
) -> Tuple[mx.array, mx.array]:
    """dt = clip(softplus(dt + dt_bias), limit) and A = -exp(A_log), in float32."""
    dt = nn.softplus(dt.astype(mx.float32) + dt_bias.astype(mx.float32))
    return mx.clip(dt, *time_step_limit), -mx.exp(A_log.astype(mx.float32))


def ssm_step_reference(
    xBC: mx.array,
    dt: mx.array,
    conv_state: mx.array,
    conv_weight: mx.array,
    conv_bias: Optional[mx.array],
    dt_bias: mx.array,
    A_log: mx.array,
    D: mx.array,
    state: mx.array,
    time_step_limit: Sequence[float],
    n_groups: int,
) -> Tuple[mx.array, mx.array, mx.array]:
    """Advance conv and SSM state by one token.

        xBC <- SiLU(conv(conv_state, xBC) + bias);  split into x | B | C
        dt  <- clip(softplus(dt + dt_bias));  A = -exp(A_log)
        S   <- exp(dt * A) * S + dt * x (outer) B
        y    = S @ C + D * x
    Head h reads group h // (H / G). dt, A and S are float32.

    Args:
        xBC: (B, C) this token's in_proj output for the conv channels.
        dt: (B, H) this token's raw dt (before dt_bias and softplus).
        conv_state: (B, K-1, C) the previous K-1 conv inputs.
        conv_weight: (C, K); conv_bias: (C,) or None.
        dt_bias, A_log, D: (H,).
        state: (B, H, P, N) float32.
        time_step_limit: (min, max) clip for dt.
        n_groups: G.

    Returns:
        y: (B, H, P) float32; the new conv_state (B, K-1, C); the new state
        (B, H, P, N) float32.
    """
    batch, heads, head_dim, n = state.shape
    per_group = heads // n_groups
    xBC, conv_state = causal_conv1d_reference(xBC[:, None], conv_weight, conv_bias, conv_state)
    x, B, C = mx.split(xBC[:, 0], [heads * head_dim, heads * head_dim + n_groups * n], axis=-1)
    dt, A = discretize(dt, dt_bias, A_log, time_step_limit)

    # (B, G, H/G, ...) views let one group's B and C serve all its heads.
    x = x.astype(mx.float32).reshape(batch, n_groups, per_group, head_dim, 1)
    B = B.astype(mx.float32).reshape(batch, n_groups, 1, 1, n)
    C = C.astype(mx.float32).reshape(batch, n_groups, 1, n, 1)
    decay = mx.exp(dt * A).reshape(batch, n_groups, per_group, 1, 1)
    dt = dt.reshape(batch, n_groups, per_group, 1, 1)
    s = state.reshape(batch, n_groups, per_group, head_dim, n)
    s = decay * s + (dt * x) * B
    y = (s @ C) + x * D.astype(mx.float32).reshape(n_groups, per_group, 1, 1)
    return (
        y.reshape(batch, heads, head_dim),
        conv_state,
        s.reshape(batch, heads, head_dim, n),
    )
