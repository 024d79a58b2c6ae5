"""Causal depthwise conv1d over [x | B | C], with the cached left context.

Shapes: B batch, L new tokens, C conv channels (d_ssm + 2 * G * N), K kernel width.

`causal_conv1d_reference` is the pure-MLX oracle; `causal_conv1d_kernel` the
same op as one Metal dispatch (conv, bias, SiLU and the new conv state);
`causal_conv1d` picks between them. The three share signature and docstring.

Metal kernel (prefill; decode runs the fused step in ssm_step.py)
-----------------------------------------------------------------
Threads: one per (channel c, block of _TOKENS_PER_THREAD tokens, batch b);
grid (C, ceil(L / 16), B), threadgroups of 256 threads along the channel axis,
so a simdgroup reads 32 consecutive channels of one token (contiguous in
memory). Each thread keeps its K weights, the bias and a sliding window of K
inputs in registers and walks its 16 tokens; the K-1 inputs before its first
token come from x or, before token 0, from the cached state. The thread that
holds the last token of a (channel, batch) also writes that channel's K-1
new-state inputs. No threadgroup memory, no barriers. Inputs are read through
their strides (ensure_row_contiguous=False), so the in_proj split that feeds
the conv is not copied first.

Memory traffic per token per layer: C inputs read and C outputs written in the
activation dtype, plus (K-1)/16 re-read halo and the weights (K+1 floats per
channel per 16 tokens, from cache): about 2 * C * 2 bytes in bfloat16.
Falcon-H1-7B (C = 3584): ~15 KB and ~2CK + 5C ~ 47 kFLOP per token per layer.
Roofline (an estimate on paper, not a measurement): ~3 FLOP/byte, far below
the ~35-50 FLOP/byte ridge, so memory-bound; at 400 GB/s (M3/M4 Max) ~38 ns
per token per layer, i.e. ~14 ms for an 8K-token prompt through 44 layers;
~150 ns per token per layer at 102 GB/s (base M2/M3). The reference runs
~3K+5 element-wise MLX ops, each streaming L x C values.
"""

from typing import Optional, Tuple

import mlx.core as mx

from . import build_metal_kernel, kernels_enabled, with_reference_vjp
from .descriptor import KernelOp, RandomInputs, register
from .elementwise import silu
from .runtime_check import kernel_allowed


def causal_conv1d_reference(
    x: mx.array,
    weight: mx.array,
    bias: Optional[mx.array],
    state: Optional[mx.array],
) -> Tuple[mx.array, mx.array]:
    """SiLU(causal depthwise conv1d(x) + bias), continuing from `state`.

    Args:
        x: (B, L, C) new inputs.
        weight: (C, K) one filter per channel; weight[:, K-1] multiplies the
            current token.
        bias: (C,) or None.
        state: (B, K-1, C) the previous K-1 inputs, or None for an empty cache
            (treated as zeros, which is what a causal conv pads with).

    Returns:
        y: (B, L, C) in x's dtype, computed in float32.
        new_state: (B, K-1, C) the last K-1 inputs, for the next call.
    """
    batch, length, channels = x.shape
    width = weight.shape[1]
    if state is None:
        state = mx.zeros((batch, width - 1, channels), dtype=x.dtype)
    padded = mx.concatenate([state, x], axis=1)  # (B, K-1+L, C)
    # A depthwise conv is K shifted multiply-adds; cheaper than a grouped conv
    # op on every backend we have measured, and exact. The taps are one fused
    # pass over K shifted views (no copies), then the SiLU.
    taps = [padded[:, k : k + length] for k in range(width)]
    y = _conv_taps(weight.astype(mx.float32), bias, *taps)
    # A copy, not a view: a view would keep all of `padded` alive in the cache.
    new_state = mx.contiguous(padded[:, padded.shape[1] - (width - 1) :])
    return silu(y).astype(x.dtype), new_state


def conv_state_at(xBC, conv_state, lengths, width):
    """The new conv state of a right-padded batch: the K-1 raw conv inputs ending at
    each row's last real token (xBC: (B, L, C); lengths: (B,) real tokens per row)."""
    if conv_state is None:
        conv_state = mx.zeros((xBC.shape[0], width - 1, xBC.shape[-1]), xBC.dtype)
    padded = mx.concatenate([conv_state, xBC], axis=1)  # (B, K-1+L, C)
    ends = mx.clip(lengths, 0, xBC.shape[1])
    rows = ends[:, None] + mx.arange(width - 1)  # padded index of the K-1 inputs
    return mx.take_along_axis(padded, rows[..., None], axis=1)


@mx.compile
def _conv_taps(w, bias, *taps):
    y = taps[0].astype(mx.float32) * w[:, 0]
    for k in range(1, len(taps)):
        y = y + taps[k].astype(mx.float32) * w[:, k]
    return y if bias is None else y + bias.astype(mx.float32)


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_TOKENS_PER_THREAD = 16  # amortises the K-1 halo re-read (1.19x at K=4) and the weight loads
_THREADS = 256  # per threadgroup, along channels: 8 simdgroups of consecutive channels
_MAX_WIDTH = 8  # register window; Falcon-H1 uses K = 4
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_SOURCE = """
    // x: [B, L, C] and state: [B, K-1, C] in T; weight: [C, K] and bias: [C] in W;
    // all read through their strides. y: [B, L, C] and new_state: [B, K-1, C] in T.
    const int c = thread_position_in_grid.x;
    const int t0 = thread_position_in_grid.y * TOKENS;
    const int b = thread_position_in_grid.z;
    const int L = x_shape[1];
    const int C = x_shape[2];
    const int64_t x_bc = b * x_strides[0] + c * x_strides[2];               // x[b, 0, c]
    const int64_t s_bc = b * state_strides[0] + c * state_strides[2];       // state[b, 0, c]

    float w[K];  // w[K-1] multiplies the current token
    for (int k = 0; k < K; ++k) {
        w[k] = static_cast<float>(weight[c * weight_strides[0] + k * weight_strides[1]]);
    }
    const float bias_c = static_cast<float>(bias[c * bias_strides[0]]);

    // window[j]: the input K-1-j tokens before the current one (window[K-1] = current)
    float window[K];
    for (int j = 0; j < K - 1; ++j) {
        const int t = t0 - (K - 1) + j;  // < 0: from the cached state
        window[j] = t >= 0 ? static_cast<float>(x[x_bc + t * x_strides[1]])
                           : static_cast<float>(state[s_bc + (t + K - 1) * state_strides[1]]);
    }
    const int t_end = min(t0 + TOKENS, L);
    for (int t = t0; t < t_end; ++t) {
        window[K - 1] = static_cast<float>(x[x_bc + t * x_strides[1]]);
        float acc = window[0] * w[0];  // the reference's order: taps, then bias
        for (int k = 1; k < K; ++k) {
            acc += window[k] * w[k];
        }
        acc += bias_c;
        y[(int64_t(b) * L + t) * C + c] = static_cast<T>(acc * (1.0f / (1.0f + metal::exp(-acc))));
        for (int k = 0; k < K - 1; ++k) {
            window[k] = window[k + 1];
        }
    }

    // The new state is the last K-1 inputs of [state | x]; the last block writes it.
    if (t_end == L) {
        for (int j = 0; j < K - 1; ++j) {
            const int t = L - (K - 1) + j;
            new_state[(int64_t(b) * (K - 1) + j) * C + c] =
                t >= 0 ? x[x_bc + t * x_strides[1]] : state[s_bc + (t + K - 1) * state_strides[1]];
        }
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_causal_conv1d",
    input_names=["x", "weight", "bias", "state"],
    output_names=["y", "new_state"],
    source=_SOURCE,
    ensure_row_contiguous=False,
)


_KERNEL = build_metal_kernel(KERNEL_SPEC)


def _fits_kernel(x, weight, bias, state) -> bool:
    """Whether causal_conv1d can take the Metal kernel for this call."""
    return (
        _KERNEL is not None
        and kernels_enabled()
        and x.ndim == 3
        and x.shape[1] >= 1
        and x.shape[2] >= 1
        and x.dtype in _FLOATS
        and weight.ndim == 2
        and weight.shape[0] == x.shape[2]
        and 2 <= weight.shape[1] <= _MAX_WIDTH
        and weight.dtype in _FLOATS
        and (bias is None or bias.dtype in _FLOATS)
        and (state is None or state.dtype == x.dtype)
    )


def _launch(kernel, x, weight, bias, state):
    batch, length, channels = x.shape
    width = weight.shape[1]
    y, new_state = kernel(
        inputs=[x, weight, bias, state],
        template=[("T", x.dtype), ("W", weight.dtype), ("K", width), ("TOKENS", _TOKENS_PER_THREAD)],
        grid=(channels, -(-length // _TOKENS_PER_THREAD), batch),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[x.shape, (batch, width - 1, channels)],
        output_dtypes=[x.dtype, x.dtype],
    )
    return y, new_state


def causal_conv1d_kernel(
    x: mx.array,
    weight: mx.array,
    bias: Optional[mx.array],
    state: Optional[mx.array],
) -> Tuple[mx.array, mx.array]:
    # docstring: causal_conv1d_reference's (assigned below)
    if _KERNEL is None:
        raise RuntimeError("causal_conv1d_kernel needs Metal; use causal_conv1d")
    batch, _, channels = x.shape
    width = weight.shape[1]
    if state is None:
        state = mx.zeros((batch, width - 1, channels), dtype=x.dtype)
    if bias is None:
        bias = mx.zeros((channels,), dtype=weight.dtype)
    elif bias.dtype != weight.dtype:  # one template type for both: widen, exactly
        weight, bias = weight.astype(mx.float32), bias.astype(mx.float32)
    fn = with_reference_vjp(
        lambda *a: _launch(_KERNEL, *a), lambda *a: causal_conv1d_reference(*a)
    )
    return fn(x, weight, bias, state)


def causal_conv1d(
    x: mx.array,
    weight: mx.array,
    bias: Optional[mx.array],
    state: Optional[mx.array],
) -> Tuple[mx.array, mx.array]:
    # docstring: causal_conv1d_reference's (assigned below)
    if _fits_kernel(x, weight, bias, state) and kernel_allowed(KERNEL_OP, dict(
            channels=x.shape[2], width=weight.shape[1], dtype=x.dtype,
            # the wrapper widens weight and bias to float32 when their dtypes differ
            wdtype=weight.dtype if bias is None or bias.dtype == weight.dtype else mx.float32)):
        return causal_conv1d_kernel(x, weight, bias, state)
    return causal_conv1d_reference(x, weight, bias, state)


causal_conv1d_kernel.__doc__ = causal_conv1d.__doc__ = causal_conv1d_reference.__doc__


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random causal_conv1d arguments; sizes: channels, width, dtype, wdtype (default
    float32). 20 tokens by default: more than one 16-token block, so the check
    covers the window carried between blocks."""
    draw, dtype, wdtype = RandomInputs(seed), sizes["dtype"], sizes.get("wdtype", mx.float32)
    c, k, length = sizes["channels"], sizes["width"], length or 20
    return dict(x=draw.normal(batch, length, c, dtype=dtype),
                weight=draw.normal(c, k, dtype=wdtype, scale=0.5),
                bias=draw.normal(c, dtype=wdtype), state=draw.normal(batch, k - 1, c, dtype=dtype))


KERNEL_OP = register(KernelOp(
    name="causal_conv1d", spec=KERNEL_SPEC, kernel=causal_conv1d_kernel,
    reference=causal_conv1d_reference, make_inputs=_random_inputs,
    # y is rounded to x's dtype from a float32 sum in another order: one unit in
    # the last place of that dtype (relative), plus float32 noise.
    tolerance={mx.float32: 2e-6, mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7}))
