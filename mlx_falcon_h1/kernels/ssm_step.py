"""The decode step: one token through conv, SiLU, dt and the SSM state update.

Legend: B batch, H SSM heads, P head dim, G groups, N state size, K conv width,
C conv channels (H*P + 2*G*N).

`ssm_step_reference` is the pure-MLX oracle; `ssm_step_kernel` the whole step
as one Metal dispatch per layer (the reference is ~20 MLX ops); `ssm_step`
picks between them. The three share signature and docstring.

Metal kernel
------------
Threads: one simdgroup (32 lanes) per state row (b, h, p); threadgroups of
(32, 16, 1) = 16 rows of one head, grid (32, P, B*H). Lane l owns the state
entries n = l, l+32, ... of its row, so each load of the row is 128
contiguous bytes per simdgroup.
Phase 1: the threadgroup's 512 threads compute conv + bias + SiLU of the
token's 2N B and C channels of the head's group (each rounded to the
activation dtype, as the reference's conv output is) into threadgroup memory
(2N floats, N <= 256); one barrier. Phase 2: each simdgroup computes its row's
x channel the same way, dt = clip(softplus(dt + dt_bias)), exp(dt * A), then
streams the row: S = exp(dt A) S + (dt x) B, y = simd_sum(S . C) + D x.
The conv state is shifted by the threads that own each channel: lane 0 of a
row for its x channel, the first threadgroup of each group's first head for
the B and C channels. All inputs are read through their strides, so the
xBC and dt views of in_proj's output are not copied first.

Memory traffic per token per layer: the fp32 state read and written, 8*H*P*N
bytes, dominates; then K*C activations and K*C + 4H parameters; B and C conv
inputs are re-read by every threadgroup of a group, from cache.
Falcon-H1-7B (H=24, P=128, N=256): 6.3 MB of state + ~0.1 MB, 4*H*P*N = 3.1
MFLOP (0.5 FLOP/byte: memory-bound). Roofline (an estimate on paper, not a
measurement): 6.4 MB / 400 GB/s = 16 us per layer on an M3/M4 Max, 0.7 ms per
token over 44 layers; 2.3 ms at 120 GB/s (base M4). At batch 1 the 4-bit
weights (~4.3 GB) still dominate decode; the state matters from batch ~8.
"""

import math
from typing import Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import build_metal_kernel, kernels_enabled, with_reference_vjp
from .conv1d import causal_conv1d_reference
from .descriptor import KernelOp, RandomInputs, register
from .runtime_check import kernel_allowed


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


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_ROWS = 16  # state rows (simdgroups) per threadgroup: 512 threads share one B/C conv
_MAX_N = 256  # threadgroup staging of B and C (2 KB); every Falcon-H1 has N <= 256
_MAX_WIDTH = 8  # conv window in registers; Falcon-H1 uses K = 4
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_HEADER = """
// log(1 + exp(v)) as mlx.nn.softplus computes it, max(v, 0) + log1p(exp(-|v|)).
// MSL has no log1p: Goldberg's form keeps its accuracy for small exp(-|v|).
inline float falcon_softplus(float v) {
    const float e = metal::exp(-metal::abs(v));
    const float u = 1.0f + e;
    const float log1p_e = u == 1.0f ? e : metal::log(u) * (e / (u - 1.0f));
    return metal::max(v, 0.0f) + log1p_e;
}

// SiLU(conv(window) + bias) of channel ch of batch b for this one token, rounded
// to T like the reference's conv output; when write_state, also shifts the
// channel's K-1 conv-state inputs into state_out. Pointer types are template
// parameters so that device and constant buffers both fit.
template <typename T, int K, typename PX, typename PS, typename PW, typename PB, typename PO>
inline float falcon_conv_silu(PX xBC, const constant int64_t* xBC_st, PS cs,
                              const constant int64_t* cs_st, PW weight,
                              const constant int64_t* w_st, PB bias, const constant int64_t* b_st,
                              PO cs_out, int b, int ch, int C, bool write_state) {
    float window[K];
    for (int k = 0; k < K - 1; ++k) {
        window[k] = static_cast<float>(cs[b * cs_st[0] + k * cs_st[1] + ch * cs_st[2]]);
    }
    window[K - 1] = static_cast<float>(xBC[b * xBC_st[0] + ch * xBC_st[1]]);
    float acc = window[0] * static_cast<float>(weight[ch * w_st[0]]);
    for (int k = 1; k < K; ++k) {
        acc += window[k] * static_cast<float>(weight[ch * w_st[0] + k * w_st[1]]);
    }
    acc += static_cast<float>(bias[ch * b_st[0]]);
    if (write_state) {
        for (int k = 0; k < K - 1; ++k) {
            cs_out[(int64_t(b) * (K - 1) + k) * C + ch] = static_cast<T>(window[k + 1]);
        }
    }
    return static_cast<float>(static_cast<T>(acc * (1.0f / (1.0f + metal::exp(-acc)))));
}
"""

# The step up to each row's S . C, summed into `acc` on every lane: shared with
# mixer_step, whose kernel ends each row with the gate instead of _SOURCE's write.
_STEP_SOURCE = """
    // xBC: [B, C], dt: [B, H], conv_state: [B, K-1, C] in T; conv_weight: [C, K],
    // conv_bias: [C], dt_bias, A_log, D: [H] in W; state: [B, H, P, N] float;
    // all read through their strides. C = H*P + 2*G*N, channels [x | B | C].
    // y: [B, H, P] float, conv_state_out: [B, K-1, C] in T, state_out: [B, H, P, N] float.
    const int lane = thread_position_in_threadgroup.x;
    const int p = thread_position_in_grid.y;
    const int bh = thread_position_in_grid.z;
    const int H = state_shape[1];
    const int P = state_shape[2];
    const int N = state_shape[3];
    const int C = xBC_shape[1];
    const int b = bh / H;
    const int h = bh % H;
    const int heads_per_group = H / n_groups;
    const int g = h / heads_per_group;
    const int b_ch = H * P + g * N;                // first B channel of group g
    const int c_ch = H * P + n_groups * N + g * N;  // first C channel of group g

    // Phase 1: this token's B (bc[0:N]) and C (bc[N:2N]) of group g, shared by
    // the threadgroup's rows. The group's first head, first row block, shifts
    // their conv state.
    threadgroup float bc[2 * MAX_N];
    const bool shifts_bc = h % heads_per_group == 0 && threadgroup_position_in_grid.y == 0;
    const int n_threads = threads_per_threadgroup.x * threads_per_threadgroup.y;
    for (int i = thread_index_in_threadgroup; i < 2 * N; i += n_threads) {
        const int ch = i < N ? b_ch + i : c_ch + (i - N);
        bc[i] = falcon_conv_silu<T, K>(xBC, xBC_strides, conv_state, conv_state_strides,
                                       conv_weight, conv_weight_strides, conv_bias,
                                       conv_bias_strides, conv_state_out, b, ch, C, shifts_bc);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);

    // Phase 2: this simdgroup's row (b, h, p).
    const float xv = falcon_conv_silu<T, K>(xBC, xBC_strides, conv_state, conv_state_strides,
                                            conv_weight, conv_weight_strides, conv_bias,
                                            conv_bias_strides, conv_state_out, b, h * P + p, C,
                                            lane == 0);
    float dtv = static_cast<float>(dt[b * dt_strides[0] + h * dt_strides[1]]) +
                static_cast<float>(dt_bias[h * dt_bias_strides[0]]);
    dtv = metal::min(metal::max(falcon_softplus(dtv), dt_min), dt_max);  // mx.clip's order
    const float A = -metal::exp(static_cast<float>(A_log[h * A_log_strides[0]]));
    const float decay = metal::exp(dtv * A);
    const float dtx = dtv * xv;

    const int64_t row_in = b * state_strides[0] + h * state_strides[1] + p * state_strides[2];
    const int64_t row_out = (int64_t(bh) * P + p) * N;
    float acc = 0.0f;
    for (int n = lane; n < N; n += 32) {
        const float s = decay * state[row_in + n * state_strides[3]] + dtx * bc[n];
        state_out[row_out + n] = s;
        acc += s * bc[N + n];
    }
    acc = simd_sum(acc);
"""
_SOURCE = _STEP_SOURCE + """\
    if (lane == 0) {
        y[int64_t(bh) * P + p] = acc + xv * static_cast<float>(D[h * D_strides[0]]);
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_ssm_step",
    input_names=[
        "xBC", "dt", "conv_state", "conv_weight", "conv_bias", "dt_bias", "A_log", "D", "state",
        "dt_min", "dt_max", "n_groups",
    ],
    output_names=["y", "conv_state_out", "state_out"],
    source=_SOURCE,
    header=_HEADER,
    ensure_row_contiguous=False,
)


_KERNEL = build_metal_kernel(KERNEL_SPEC)


def _fits_kernel(xBC, dt, conv_state, conv_weight, conv_bias, state, n_groups) -> bool:
    """Whether ssm_step can take the Metal kernel for this call."""
    return _KERNEL is not None and fits_step_source(xBC, dt, conv_state, conv_weight, conv_bias,
                                                    state, n_groups)


def fits_step_source(xBC, dt, conv_state, conv_weight, conv_bias, state, n_groups) -> bool:
    """Whether _STEP_SOURCE (this kernel's, and mixer_step's) takes these inputs."""
    batch, heads, head_dim, n = state.shape
    return (
        kernels_enabled()
        and xBC.dtype in _FLOATS
        and dt.dtype == xBC.dtype
        and conv_state.dtype == xBC.dtype
        and conv_weight.dtype in _FLOATS
        and (conv_bias is None or conv_bias.dtype in _FLOATS)
        and state.dtype == mx.float32
        and 2 <= conv_weight.shape[1] <= _MAX_WIDTH
        and heads % n_groups == 0
        and 1 <= n <= _MAX_N
        and xBC.shape == (batch, heads * head_dim + 2 * n_groups * n)
    )


def step_parameters(conv_weight, conv_bias, dt_bias, A_log, D) -> list:
    """The step kernels' parameter inputs: a zero conv bias where there is none,
    all widened to float32 unless they share conv_weight's dtype (one template
    type W; widening is exact)."""
    params = [conv_weight, conv_bias, dt_bias, A_log, D]
    if conv_bias is None:
        params[1] = mx.zeros((conv_weight.shape[0],), dtype=conv_weight.dtype)
    if any(a.dtype != conv_weight.dtype for a in params):
        params = [a.astype(mx.float32) for a in params]
    return params


def _param_dtype(*params) -> mx.Dtype:
    """The kernel's W: the parameters' dtype, or float32 when they differ (the
    wrapper widens them), so the run-time check tests the instantiation that runs."""
    dtypes = {a.dtype for a in params if a is not None}
    return dtypes.pop() if len(dtypes) == 1 else mx.float32


def _launch(kernel, xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state,
            time_step_limit, n_groups):
    batch, heads, head_dim, n = state.shape
    width = conv_weight.shape[1]
    return tuple(
        kernel(
            inputs=[xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state,
                    float(time_step_limit[0]), float(time_step_limit[1]), int(n_groups)],
            template=[("T", xBC.dtype), ("W", conv_weight.dtype), ("K", width),
                      ("MAX_N", _MAX_N)],
            grid=(32, head_dim, batch * heads),
            threadgroup=(32, _ROWS, 1),
            output_shapes=[(batch, heads, head_dim), conv_state.shape, state.shape],
            output_dtypes=[mx.float32, xBC.dtype, mx.float32],
        )
    )


def ssm_step_kernel(
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
    # docstring: ssm_step_reference's (assigned below)
    if _KERNEL is None:
        raise RuntimeError("ssm_step_kernel needs Metal; use ssm_step")
    params = step_parameters(conv_weight, conv_bias, dt_bias, A_log, D)
    limit = tuple(time_step_limit)

    def kernel_fn(*a):
        return _launch(_KERNEL, *a, limit, n_groups)

    def reference_fn(*a):
        return ssm_step_reference(*a, limit, n_groups)

    fn = with_reference_vjp(kernel_fn, reference_fn)
    return fn(xBC, dt, conv_state, params[0], params[1], params[2], params[3], params[4], state)


def ssm_step(
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
    # docstring: ssm_step_reference's (assigned below)
    args = (xBC, dt, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state,
            time_step_limit, n_groups)
    if _fits_kernel(xBC, dt, conv_state, conv_weight, conv_bias, state, n_groups) and kernel_allowed(
            KERNEL_OP, dict(heads=state.shape[1], head_dim=state.shape[2], groups=n_groups,
                            n=state.shape[3], width=conv_weight.shape[1], dtype=xBC.dtype,
                            wdtype=_param_dtype(conv_weight, conv_bias, dt_bias, A_log, D))):
        return ssm_step_kernel(*args)
    return ssm_step_reference(*args)


ssm_step_kernel.__doc__ = ssm_step.__doc__ = ssm_step_reference.__doc__


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random ssm_step arguments (one token: `length` is not used); sizes: heads,
    head_dim, groups, n, width, dtype, wdtype (default float32)."""
    draw, dtype, wdtype = RandomInputs(seed), sizes["dtype"], sizes.get("wdtype", mx.float32)
    h, p, g, n, k = (sizes[f] for f in ("heads", "head_dim", "groups", "n", "width"))
    c = h * p + 2 * g * n
    a_log = draw.a_log(h, wdtype)
    return dict(xBC=draw.normal(batch, c, dtype=dtype), dt=draw.normal(batch, h, dtype=dtype),
                conv_state=draw.normal(batch, k - 1, c, dtype=dtype),
                conv_weight=draw.normal(c, k, dtype=wdtype, scale=0.5),
                conv_bias=draw.normal(c, dtype=wdtype), dt_bias=draw.normal(h, dtype=wdtype),
                A_log=a_log, D=draw.normal(h, dtype=wdtype), state=draw.normal(batch, h, p, n),
                time_step_limit=(0.0, math.inf), n_groups=g)


KERNEL_OP = register(KernelOp(
    name="ssm_step", spec=KERNEL_SPEC, kernel=ssm_step_kernel, reference=ssm_step_reference,
    make_inputs=_random_inputs,
    # y and the state are float32, but in 16-bit dtypes the conv output is rounded
    # to the dtype before the SSM, and a float32 difference can flip that rounding.
    tolerance={mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}))
