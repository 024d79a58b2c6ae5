"""RoPE of the queries and keys together: one dispatch, read where in_proj left them.

Legend: B batch, Hq query heads, Hk key heads, L tokens, D head dim.

`rope_qk_reference` is the pure-MLX oracle (the model's path before this
kernel: one mx.fast.rope over q and k concatenated along the heads, then split);
`rope_qk_kernel` is one Metal dispatch reading q and k through their strides
(they are transposed views of the projections' output), so the concatenation's
copy and its launch are gone; `rope_qk` picks between them. The three share
signature and docstring.

Why the K/V write is not in this kernel: mx.fast.metal_kernel's outputs are
new arrays (init_value only fills them), with no aliasing of an input; writing
the key into the cache's buffer from a kernel would mean making the whole
buffer an output, a copy of every cached key per token. The write stays the
cache's slice update, which MLX does in place.

Metal kernel
------------
One thread per rotated pair (i, i + D/2) of one head of one token: grid
(D/2, Hq + Hk, B*L), q's heads first. The angle is float32's
(scale * position) * (1 / freq), as mx.fast.rope computes it with given
frequencies; cos and sin are metal::precise (mx.fast.rope takes fast::, whose
error grows with the angle: at Falcon-H1's 262,144 positions angles reach 2.6e5
rad). Memory: each element of q and k read and written once.
"""

from typing import Tuple, Union

import mlx.core as mx

from . import build_metal_kernel, kernels_enabled, with_reference_vjp
from .descriptor import KernelOp, RandomInputs, register
from .runtime_check import kernel_allowed

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_MAX_HALF = 1024  # D/2 threads per threadgroup


def rope_qk_reference(
    q: mx.array, k: mx.array, offset: Union[int, mx.array], freqs: mx.array, scale: float
) -> Tuple[mx.array, mx.array]:
    """Rotate q and k ("rotate half", over the whole head dim) at their positions.

        theta_i = (scale * (offset + t)) / freqs_i,  i < D/2
        x[i], x[i + D/2] <- x[i] cos - x[i + D/2] sin, x[i] sin + x[i + D/2] cos

    Args:
        q: (B, Hq, L, D); k: (B, Hk, L, D), of one dtype.
        offset: the first token's position: an int, or an int array () or (B,)
            (a position per row of a batch).
        freqs: (D/2,) float32, base^(2i/D).
        scale: the positions' scale (1 / a linear scaling's factor).

    Returns:
        q and k rotated, in their dtype.
    """
    both = mx.fast.rope(mx.concatenate([q, k], axis=1), q.shape[-1], traditional=False, base=None,
                        scale=scale, offset=offset, freqs=freqs)
    q, k = mx.split(both, [q.shape[1]], axis=1)
    return q, k


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_SOURCE = """
    // q: [B, Hq, L, D], k: [B, Hk, L, D] in T; offset: [B] int; freqs: [D/2] float;
    // all read through their strides. q_out, k_out: row-contiguous, in T.
    const int i = thread_position_in_grid.x;
    const int head = thread_position_in_grid.y;
    const int bt = thread_position_in_grid.z;
    const int Hq = q_shape[1];
    const int L = q_shape[2];
    const int half = q_shape[3] / 2;
    const int b = bt / L;
    const int t = bt % L;
    const float position = scale * static_cast<float>(offset[b * offset_strides[0]] + t);
    const float theta = position * (1.0f / static_cast<float>(freqs[i * freqs_strides[0]]));
    const float c = metal::precise::cos(theta);
    const float s = metal::precise::sin(theta);
    if (head < Hq) {
        const int64_t row = b * q_strides[0] + head * q_strides[1] + t * q_strides[2];
        const float x1 = static_cast<float>(q[row + i * q_strides[3]]);
        const float x2 = static_cast<float>(q[row + (i + half) * q_strides[3]]);
        const int64_t at = ((int64_t(b) * Hq + head) * L + t) * 2 * half;
        q_out[at + i] = static_cast<T>(x1 * c - x2 * s);
        q_out[at + i + half] = static_cast<T>(x1 * s + x2 * c);
    } else {
        const int kh = head - Hq;
        const int Hk = k_shape[1];
        const int64_t row = b * k_strides[0] + kh * k_strides[1] + t * k_strides[2];
        const float x1 = static_cast<float>(k[row + i * k_strides[3]]);
        const float x2 = static_cast<float>(k[row + (i + half) * k_strides[3]]);
        const int64_t at = ((int64_t(b) * Hk + kh) * L + t) * 2 * half;
        k_out[at + i] = static_cast<T>(x1 * c - x2 * s);
        k_out[at + i + half] = static_cast<T>(x1 * s + x2 * c);
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_rope_qk",
    input_names=["q", "k", "offset", "freqs", "scale"],
    output_names=["q_out", "k_out"],
    source=_SOURCE,
    ensure_row_contiguous=False,
)


_KERNEL = build_metal_kernel(KERNEL_SPEC)


def _fits_kernel(q, k, offset, freqs) -> bool:
    """Whether rope_qk can take the Metal kernel for this call."""
    if q.ndim != 4 or k.ndim != 4:
        return False
    batch, _, length, dims = q.shape
    offset_ok = not isinstance(offset, mx.array) or (
        offset.dtype in (mx.int32, mx.int64, mx.uint32) and offset.shape in ((), (batch,)))
    return (
        _KERNEL is not None
        and kernels_enabled()
        and q.dtype in _FLOATS
        and k.dtype == q.dtype
        and (k.shape[0], k.shape[2], k.shape[3]) == (batch, length, dims)
        and dims % 2 == 0
        and 1 <= dims // 2 <= _MAX_HALF
        and freqs.shape == (dims // 2,)
        and freqs.dtype == mx.float32
        and offset_ok
    )


def _launch(kernel, q, k, offset, freqs, scale):
    batch, q_heads, length, dims = q.shape
    return tuple(
        kernel(
            inputs=[q, k, offset, freqs, float(scale)],
            template=[("T", q.dtype)],
            grid=(dims // 2, q_heads + k.shape[1], batch * length),
            threadgroup=(dims // 2, 1, 1),
            output_shapes=[q.shape, k.shape],
            output_dtypes=[q.dtype, q.dtype],
        )
    )


def rope_qk_kernel(
    q: mx.array, k: mx.array, offset: Union[int, mx.array], freqs: mx.array, scale: float
) -> Tuple[mx.array, mx.array]:
    # docstring: rope_qk_reference's (assigned below)
    if _KERNEL is None:
        raise RuntimeError("rope_qk_kernel needs Metal; use rope_qk")
    # A position per row (a stride-0 view of one offset: no copy, no launch).
    offsets = offset if isinstance(offset, mx.array) else mx.array(offset)
    offsets = mx.broadcast_to(offsets.astype(mx.int32), (q.shape[0],))

    def kernel_fn(q, k, freqs):
        return _launch(_KERNEL, q, k, offsets, freqs, scale)

    def reference_fn(q, k, freqs):
        return rope_qk_reference(q, k, offset, freqs, scale)

    return with_reference_vjp(kernel_fn, reference_fn)(q, k, freqs)


def rope_qk(
    q: mx.array, k: mx.array, offset: Union[int, mx.array], freqs: mx.array, scale: float
) -> Tuple[mx.array, mx.array]:
    # docstring: rope_qk_reference's (assigned below)
    if _fits_kernel(q, k, offset, freqs) and kernel_allowed(
            KERNEL_OP, dict(heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3],
                            dtype=q.dtype)):
        return rope_qk_kernel(q, k, offset, freqs, scale)
    return rope_qk_reference(q, k, offset, freqs, scale)


rope_qk_kernel.__doc__ = rope_qk.__doc__ = rope_qk_reference.__doc__


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random rope_qk arguments; sizes: heads, kv_heads (default heads), head_dim,
    dtype; `length` tokens (None: 1, a decode step) at positions from a large offset."""
    draw, dtype = RandomInputs(seed), sizes["dtype"]
    h, hk, d = sizes["heads"], sizes.get("kv_heads", sizes["heads"]), sizes["head_dim"]
    length = 1 if length is None else length
    # Falcon-H1's base 1e11, and positions far out, where angles are large.
    freqs = mx.array(1e11 ** (mx.arange(0, d, 2, dtype=mx.float32) / d))
    offset = mx.array(draw.rng.integers(0, 200_000, batch).astype("int32"))
    return dict(q=draw.normal(batch, h, length, d, dtype=dtype),
                k=draw.normal(batch, hk, length, d, dtype=dtype), offset=offset, freqs=freqs,
                scale=1.0)


KERNEL_OP = register(KernelOp(
    name="rope_qk", spec=KERNEL_SPEC, kernel=rope_qk_kernel, reference=rope_qk_reference,
    make_inputs=_random_inputs,
    # A rotation of each pair: the float32 angle is the same, cos and sin within
    # an ulp or two; 16-bit dtypes round the result once.
    tolerance={mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}))
