"""The residual add and the RMSNorm that follows it, in one dispatch.

Legend: D hidden size; rows: every leading index of h ((B, L) in the model).

In a decode step each layer adds a projection's output to the residual stream
(a quantized matmul has no addmm form, so the add is its own launch) and then
normalizes the sum: two launches, one kernel here. The norm's output dtype is
an argument: a bfloat16 model keeps its norms' weights in float32, so
mx.fast.rms_norm returns float32 and every following matmul would cast its
bfloat16 weights to float32 each step; the model asks for its activations' dtype.

`residual_rms_norm_reference` is the pure-MLX oracle (the add, then
mx.fast.rms_norm, then the cast); `residual_rms_norm_kernel` is one Metal
dispatch; `residual_rms_norm` picks between them. The three share signature and
docstring.

Metal kernel
------------
One threadgroup per row: grid (threads, rows, 1), threads a multiple of 32,
about D / 4 of them (MLX's own rms_norm reads 4 elements per thread), at most
1024. Pass 1: each thread strides over the row, s_i = S(h_i + delta_i) (the sum
in float32, rounded once to S, as MLX's add rounds), written out, and sums
float(s_i)^2; simd_sum, one partial per simdgroup in threadgroup memory, one
barrier, every thread adds the partials in the same order. r =
precise::rsqrt(sum / D + eps). Pass 2 reads back the s_i it wrote (h_i without
delta) and writes n_i = O(N(N(s_i r) w_i)), N = result_type(S, weight dtype): the
roundings mx.fast.rms_norm makes (it casts x r to its output dtype before
multiplying by the weight, on the CPU and on the GPU), so the kernel differs
from the reference only through r. Without delta the s output is not written
(s is h) and the kernel is the norm alone, already in out_dtype (no cast's launch).
Memory: h, delta and w read once, s written and read back (from cache), n
written; a 7B decode row (D = 3072, bfloat16) is ~30 KB, nothing to a launch.
"""

from typing import Optional, Tuple

import mlx.core as mx

from . import build_metal_kernel, kernels_enabled, with_reference_vjp
from .descriptor import KernelOp, RandomInputs, register
from .runtime_check import kernel_allowed

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_READS = 4  # elements per thread before the threadgroup grows (MLX's rms_norm: N_READS = 4)
_MAX_THREADS = 1024  # Metal's threadgroup limit; partial[] below holds 1024 / 32 sums


def residual_rms_norm_reference(
    h: mx.array, delta: Optional[mx.array], weight: mx.array, eps: float, out_dtype: mx.Dtype
) -> Tuple[mx.array, mx.array]:
    """The residual add and the RMSNorm after it.

        s = h + delta (h itself when delta is None), in mx.result_type(h, delta)
        n = mx.fast.rms_norm(s, weight, eps).astype(out_dtype)

    Args:
        h: (..., D) the residual stream, any float dtype.
        delta: (..., D) what is added to it (h's shape, any float dtype), or None.
        weight: (D,) the norm's weight, any float dtype.
        eps: the norm's epsilon.
        out_dtype: the dtype of n.

    Returns:
        s (the new residual stream) and n (its norm, in out_dtype).
    """
    if delta is not None and delta.shape != h.shape:
        raise ValueError(f"residual_rms_norm: delta's shape {delta.shape} is not h's {h.shape}")
    s = h if delta is None else h + delta
    return s, mx.fast.rms_norm(s, weight, eps).astype(out_dtype)


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_SOURCE = """
    // h, delta: [rows, D] row-contiguous (delta is h again, unread, without RESIDUAL);
    // weight: [D]; s_out: [rows, D] in S (not written without RESIDUAL); n_out: [rows, D] in O.
    const int D = weight_shape[0];
    const int tid = thread_position_in_threadgroup.x;
    const int threads = threads_per_threadgroup.x;
    const int64_t row = int64_t(threadgroup_position_in_grid.y) * D;
    threadgroup float partial[32];  // one sum of squares per simdgroup

    float sumsq = 0.0f;
    for (int i = tid; i < D; i += threads) {
        const S s = RESIDUAL ? static_cast<S>(static_cast<float>(h[row + i]) +
                                              static_cast<float>(delta[row + i]))
                             : static_cast<S>(h[row + i]);
        if (RESIDUAL) {
            s_out[row + i] = s;
        }
        sumsq += static_cast<float>(s) * static_cast<float>(s);
    }
    sumsq = simd_sum(sumsq);
    if (thread_index_in_simdgroup == 0) {
        partial[simdgroup_index_in_threadgroup] = sumsq;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (int g = 0; g < (threads + 31) / 32; ++g) {
        total += partial[g];
    }
    const float r = metal::precise::rsqrt(total / static_cast<float>(D) + eps);

    for (int i = tid; i < D; i += threads) {
        const S s = RESIDUAL ? s_out[row + i] : static_cast<S>(h[row + i]);  // its own writes
        // mx.fast.rms_norm's roundings: x r in N, then the weight's product in N.
        const N xr = static_cast<N>(static_cast<float>(s) * r);
        const N wn = static_cast<N>(weight[i]);
        n_out[row + i] = static_cast<O>(static_cast<N>(static_cast<float>(xr) *
                                                       static_cast<float>(wn)));
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_residual_rms_norm",
    input_names=["h", "delta", "weight", "eps"],
    output_names=["s_out", "n_out"],
    source=_SOURCE,
    ensure_row_contiguous=True,  # a decode step's h and a matmul's output already are
)


_KERNEL = build_metal_kernel(KERNEL_SPEC)


def _threads(dims: int) -> int:
    """Threads per row: ~dims / _READS, a whole number of simdgroups, at most _MAX_THREADS."""
    return min(_MAX_THREADS, 32 * -(-dims // (32 * _READS)))


def _fits_kernel(h, delta, weight, out_dtype) -> bool:
    """Whether residual_rms_norm can take the Metal kernel for this call."""
    return (
        _KERNEL is not None
        and kernels_enabled()
        and h.ndim >= 1
        and h.size > 0
        and h.dtype in _FLOATS
        and (delta is None or (delta.dtype in _FLOATS and delta.shape == h.shape))
        and weight is not None
        and weight.dtype in _FLOATS
        and weight.shape == (h.shape[-1],)
        and out_dtype in _FLOATS
    )


def _launch(kernel, h, delta, weight, eps, out_dtype):
    dims = h.shape[-1]
    residual = delta is not None
    s_dtype = mx.result_type(h, delta) if residual else h.dtype
    threads = _threads(dims)
    return tuple(
        kernel(
            inputs=[h, delta if residual else h, weight, float(eps)],
            template=[("S", s_dtype), ("N", mx.result_type(s_dtype, weight.dtype)),
                      ("O", out_dtype), ("RESIDUAL", residual)],
            grid=(threads, h.size // dims, 1),
            threadgroup=(threads, 1, 1),
            # Without delta s is h: a one-element placeholder the kernel leaves alone.
            output_shapes=[h.shape if residual else (1,), h.shape],
            output_dtypes=[s_dtype, out_dtype],
        )
    )


def residual_rms_norm_kernel(
    h: mx.array, delta: Optional[mx.array], weight: mx.array, eps: float, out_dtype: mx.Dtype
) -> Tuple[mx.array, mx.array]:
    # docstring: residual_rms_norm_reference's (assigned below)
    if _KERNEL is None:
        raise RuntimeError("residual_rms_norm_kernel needs Metal; use residual_rms_norm")
    if delta is None:
        def norm_fn(h, weight):
            return _launch(_KERNEL, h, None, weight, eps, out_dtype)[1:]

        def norm_reference_fn(h, weight):
            return residual_rms_norm_reference(h, None, weight, eps, out_dtype)[1:]

        (n,) = with_reference_vjp(norm_fn, norm_reference_fn)(h, weight)
        return h, n

    def kernel_fn(h, delta, weight):
        return _launch(_KERNEL, h, delta, weight, eps, out_dtype)

    def reference_fn(h, delta, weight):
        return residual_rms_norm_reference(h, delta, weight, eps, out_dtype)

    return tuple(with_reference_vjp(kernel_fn, reference_fn)(h, delta, weight))


def residual_rms_norm(
    h: mx.array, delta: Optional[mx.array], weight: mx.array, eps: float, out_dtype: mx.Dtype
) -> Tuple[mx.array, mx.array]:
    # docstring: residual_rms_norm_reference's (assigned below)
    if _fits_kernel(h, delta, weight, out_dtype) and kernel_allowed(
            KERNEL_OP, dict(dim=h.shape[-1], dtype=h.dtype,
                            delta=None if delta is None else delta.dtype, wdtype=weight.dtype,
                            out_dtype=out_dtype)):
        return residual_rms_norm_kernel(h, delta, weight, eps, out_dtype)
    return residual_rms_norm_reference(h, delta, weight, eps, out_dtype)


residual_rms_norm_kernel.__doc__ = residual_rms_norm.__doc__ = residual_rms_norm_reference.__doc__


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random residual_rms_norm arguments, (batch, length, D); sizes: dim, dtype (h's),
    delta (delta's dtype, default dtype; None: no delta), wdtype (default float32, as
    the models keep their norms' weights), out_dtype (default dtype). length None: 1."""
    draw, dtype = RandomInputs(seed), sizes["dtype"]
    dims, length = sizes["dim"], 1 if length is None else length
    delta_dtype = sizes.get("delta", dtype)
    return dict(
        h=draw.normal(batch, length, dims, dtype=dtype, scale=4.0),
        delta=None if delta_dtype is None else draw.normal(batch, length, dims, dtype=delta_dtype),
        weight=1.0 + draw.normal(dims, dtype=sizes.get("wdtype", mx.float32), scale=0.5),
        eps=1e-5, out_dtype=sizes.get("out_dtype", dtype))


def _rounded_dtype(sizes) -> mx.Dtype:
    """The coarsest dtype the outputs are rounded to: the sum's or the output's."""
    dtype, delta_dtype = sizes["dtype"], sizes.get("delta")
    s_dtype = dtype if delta_dtype is None else mx.result_type(dtype, delta_dtype)
    return max((s_dtype, sizes.get("out_dtype", dtype)), key=lambda d: _TOLERANCE[d])


# Kernel and reference differ only through r = rsqrt(mean(s^2) + eps): s is
# bit-identical (one rounding of a float32 sum to S in both), and n takes the
# same roundings from the same s and r. r: D float32 squares summed in another
# order (relative difference ~sqrt(D) * 2^-24 in practice, 5e-6 at D = 8192;
# D * 2^-24 at worst), halved by the rsqrt, plus its ulp; the products add a
# few float32 ulps: 2e-5 in float32. Where r's difference carries x r across a
# rounding boundary of N or O, n differs by one ulp of that dtype: at most
# 2^-10 (float16) and 2^-7 (bfloat16) of the element, so of max |n|: 2e-3, 1e-2.
_TOLERANCE = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}

KERNEL_OP = register(KernelOp(
    name="residual_rms_norm", spec=KERNEL_SPEC, kernel=residual_rms_norm_kernel,
    reference=residual_rms_norm_reference, make_inputs=_random_inputs, tolerance=_TOLERANCE,
    tolerance_dtype=_rounded_dtype))
