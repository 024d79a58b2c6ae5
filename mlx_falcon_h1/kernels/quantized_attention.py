"""One decode query's attention over quantized K/V (--kv-bits) plus a float tail.

Legend: B batch, Hq query heads, Hkv key/value heads (Hq = R * Hkv), D head dim,
Cb the quantized bulk's capacity (positions), Ct the float tail's, P partials
(blocks of keys) per K/V head.

With --kv-bits the cache keeps the older keys and values quantized (mx.quantize's
affine mode: per group of `group_size` elements of a row, x = scale * q + bias,
q of `bits` bits packed into uint32 words, low bits first) and the newest ones in
float (a small tail, quantized into the bulk outside the step). A decode step's
query attends to the union of both.

`quantized_decode_attention_reference` is the pure-MLX oracle, and on the CPU
the fast path: at 7B's shape (Hq 12, Hkv 2, D 128, group 64), bfloat16, mlx-lm's
quantized attention takes 54 ms per layer at 4K keys and ~450 at 32K on this
project's 2-core Linux CI machine (MLX's CPU quantized matmuls in bfloat16);
this, all in float32 with the keys dequantized in blocks, 3.6-4.2 and 30-37
(float32 inputs: mlx-lm 8.1 and 65-107, this 3.4-3.9 and 30-37).
`quantized_decode_attention_kernel` is two Metal launches; the dispatcher
`quantized_decode_attention` picks between them. The three share signature and
docstring.

Metal kernel
------------
Pass 1 (`_KERNEL`, split-K): the keys of each K/V head are cut into P blocks
(bulk blocks first, then tail blocks; `_partition`). One simdgroup per (b, K/V
head, block): lane l holds elements [l*E, l*E + E) of a row (E = D/32) and, for
the R query heads of the K/V head, their scaled queries. For each real key of
its block it dequantizes (or reads) the key once, forms the R scores with R
simd_sums, and updates R online softmaxes (running max m, sum l, unnormalized
output o) with the value read once. So each K/V element is read once per K/V
head, not once per query head. It writes (m, l) and o (D floats) per query head
per block, in float32.
Pass 2 (`_KERNEL_COMBINE`): one simdgroup per (b, query head) merges the P
blocks: M = max m_p, out = sum_p o_p exp(m_p - M) / sum_p l_p exp(m_p - M),
rounded to q's dtype.
Blocks past the real lengths (bulk_len, tail_len are read on the GPU, so a
compiled step does not retrace per token) write m = -FLT_MAX, l = 0, o = 0
and weigh nothing (exp(-FLT_MAX - M) = 0: no infinities, which Metal's default
fast math assumes away).

Memory per call (B=1; Falcon-H1-7B: Hq 12, Hkv 2, D 128) at 32K bulk keys:
K and V packed, 2 * 2 * 32768 * 128 * bits/8 bytes (8 MiB at 4 bits, 16 at 8),
plus scales and biases (2 * 2 * 2 * 32768 * 128/64 * 2 bytes = 1 MiB at group
64, bfloat16); the partials add 2 * Hq * P * (D + 2) * 4 bytes (1.6 MiB at
P = 128, written once, read once).
"""

import math
from typing import Tuple

import mlx.core as mx

from . import build_metal_kernel, kernels_enabled
from .descriptor import KernelOp, RandomInputs, register
from .runtime_check import kernel_allowed

QuantizedArray = Tuple[mx.array, mx.array, mx.array]  # (packed uint32, scales, biases)

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_BITS = (2, 4, 8)  # each element within one uint32 word (3, 5, 6 bits straddle words)
_GROUP_SIZES = (32, 64, 128)
# Registers per lane: R*E floats of queries and as many of output; past this
# many each (D = 128 with R = 16, D = 256 with R = 8) they would spill.
_MAX_ROW_FLOATS = 64
_MAX_HEAD_DIM = 256
# Blocks: at least MIN_BLOCK keys each, so a block's D + 2 floats of partial
# results per query head stay small next to the keys it reads; at most
# MAX_BLOCKS per K/V head and part, so pass 2 stays short. 7B at 32K keys: 128
# blocks of 256 keys per K/V head, 256 simdgroups. Not tuned on a GPU.
MIN_BLOCK = 64
MAX_BLOCKS = 128
_SIMDGROUPS = 4  # simdgroups (blocks) per pass-1 threadgroup; they share nothing
# The reference's keys dequantized at once (float32, 4 MiB at 7B's 2 K/V heads
# of 128): measured on the CPU, 512: 22 ms at 32K keys, 1024: 18, 4096: 17.
SCORE_BLOCK = 4096


def quantized_decode_attention_reference(
    q: mx.array,
    keys: QuantizedArray,
    values: QuantizedArray,
    bulk_len: mx.array,
    tail_keys: mx.array,
    tail_values: mx.array,
    tail_len: mx.array,
    scale: float,
    group_size: int,
    bits: int,
) -> mx.array:
    """softmax(scale * q . k) @ v over the real keys of a quantized bulk and a float tail.

        K = [dequantize(keys)[:bulk_len]; tail_keys[:tail_len]], V likewise
        out = softmax(scale * q K^T) V,  query head h attending K/V head h // R

    The bulk is dequantized as mx.dequantize does (scale * q + bias per group),
    in float32 (the scales and biases widened, nothing rounded to the K/V dtype,
    as MLX's quantized matmuls compute); scores, softmax and the weighted sum in
    float32; the result rounded to q's dtype once.

    Args:
        q: (B, Hq, 1, D), float32, float16 or bfloat16 (may be a strided view).
        keys, values: the bulk, each (packed, scales, biases): packed
            (B, Hkv, Cb, D * bits / 32) uint32; scales, biases (B, Hkv, Cb,
            D / group_size) in the K/V dtype.
        bulk_len: int32 array (): positions [0, bulk_len) of the bulk are real.
        tail_keys, tail_values: (B, Hkv, Ct, D) in the K/V dtype.
        tail_len: int32 array (): positions [0, tail_len) of the tail are real.
            Either length may be 0, not both. Positions past the lengths must
            hold finite values (the cache's zeros or older keys): they get
            weight 0.
        scale: the score scale (D^-0.5).
        group_size, bits: the bulk's quantization (mx.quantize's).

    Returns:
        (B, Hq, 1, D) in q's dtype.
    """
    b, hq, _, d = q.shape
    hkv, cb, ct = tail_keys.shape[1], keys[0].shape[2], tail_keys.shape[2]
    f32 = mx.float32
    # The R query heads of a K/V head as R rows of one matrix: the keys are read
    # once per K/V head (mlx-lm's version reads them R times, one row each).
    qs = (q.astype(f32) * scale).reshape(b, hkv, hq // hkv, d)
    scores = []  # (B, Hkv, R, Cb), then (B, Hkv, R, Ct)
    if cb:
        scores.append(_bulk_scores(qs, keys, group_size, bits))
    if ct:
        scores.append(qs @ tail_keys.astype(f32).swapaxes(-1, -2))
    real = mx.concatenate([mx.arange(cb) < bulk_len, mx.arange(ct) < tail_len])
    scores = scores[0] if len(scores) == 1 else mx.concatenate(scores, axis=-1)
    weights = mx.softmax(mx.where(real, scores, -mx.inf), axis=-1)  # (B, Hkv, R, Cb + Ct)
    out = 0.0
    if cb:  # MLX's CPU quantized_matmul is fast this way round (not transposed)
        packed, v_scales, v_biases = values
        out = mx.quantized_matmul(weights[..., :cb], packed, v_scales.astype(f32),
                                  v_biases.astype(f32), transpose=False,
                                  group_size=group_size, bits=bits)
    if ct:
        out = out + weights[..., cb:] @ tail_values.astype(f32)
    return out.reshape(b, hq, 1, d).astype(q.dtype)


def _bulk_scores(qs, keys, group_size, bits):
    """qs @ dequantize(keys)^T in float32: (B, Hkv, R, D) x (B, Hkv, Cb, D) -> (B, Hkv, R, Cb).

    In blocks of SCORE_BLOCK keys, each dequantized to float32 and multiplied
    by BLAS. MLX's CPU quantized_matmul(transpose=True) is the slow part of the
    attention here (7B's shape, bfloat16, 4-bit: 5.4 ms at 4K keys, 43 at 32K;
    this: 1.7 and 19); its transpose=False, used for the values, is fast.
    """
    f32 = mx.float32
    packed, scales, biases = keys[0], keys[1].astype(f32), keys[2].astype(f32)
    blocks = []
    for start in range(0, packed.shape[2], SCORE_BLOCK):
        stop = start + SCORE_BLOCK
        k = mx.dequantize(packed[:, :, start:stop], scales[:, :, start:stop],
                          biases[:, :, start:stop], group_size=group_size, bits=bits)
        blocks.append(qs @ k.swapaxes(-1, -2))
    return blocks[0] if len(blocks) == 1 else mx.concatenate(blocks, axis=-1)


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_HEADER = """
// Elements [e0, e0 + E) of row (b, h, t) of a quantized array, as float32:
// scale * q + bias of their group, q = BITS bits of a uint32 word, low bits
// first (mx.quantize's affine packing; BITS divides 32, so no element straddles
// two words). Pointer types are template parameters (device buffers, or the
// emulator's checked pointers).
template <int E, int BITS, int GROUP, typename PQ, typename PS, typename PB>
inline void falcon_dequantize_row(thread float* out, PQ packed, const constant int64_t* q_st,
                                  PS scales, const constant int64_t* s_st, PB biases,
                                  const constant int64_t* b_st, int b, int h, int t, int e0) {
    const int64_t qrow = b * q_st[0] + h * q_st[1] + t * q_st[2];
    const int64_t srow = b * s_st[0] + h * s_st[1] + t * s_st[2];
    const int64_t brow = b * b_st[0] + h * b_st[1] + t * b_st[2];
    for (int i = 0; i < E; ++i) {
        const int e = e0 + i;
        const uint word = packed[qrow + ((e * BITS) / 32) * q_st[3]];
        const float level = static_cast<float>((word >> ((e * BITS) % 32)) & ((1u << BITS) - 1u));
        const int g = e / GROUP;
        out[i] = static_cast<float>(scales[srow + g * s_st[3]]) * level +
                 static_cast<float>(biases[brow + g * b_st[3]]);
    }
}
"""

_SOURCE = """
    // q: [B, Hq, 1, D] in T; k_packed, v_packed: [B, Hkv, Cb, D*BITS/32] uint32;
    // k_scales, k_biases, v_scales, v_biases: [B, Hkv, Cb, D/GROUP] in T;
    // tail_k, tail_v: [B, Hkv, Ct, D] in T; bulk_len, tail_len: int (0-d arrays);
    // all read through their strides. Outputs, row-contiguous, P = grid's y:
    // o_part: [B, Hq, P, D] float, ml_part: [B, Hq, P, 2] float (max, sum).
    const int lane = thread_index_in_simdgroup;
    const int part = thread_position_in_grid.y;
    const int parts = threads_per_grid.y;
    const int bk = thread_position_in_grid.z;
    const int Hkv = tail_k_shape[1];
    const int b = bk / Hkv;
    const int kh = bk % Hkv;
    const int Cb = k_packed_shape[2];
    const int Ct = tail_k_shape[2];
    const int D = E * 32;
    const int e0 = lane * E;

    // This simdgroup's block: bulk blocks first, then tail blocks.
    const int bulk_parts = (Cb + bulk_block - 1) / bulk_block;
    const bool in_bulk = part < bulk_parts;
    const int first = in_bulk ? part * bulk_block : (part - bulk_parts) * tail_block;
    const int real = in_bulk ? metal::min(static_cast<int>(bulk_len), Cb)
                             : metal::min(static_cast<int>(tail_len), Ct);
    const int last = metal::min(first + (in_bulk ? bulk_block : tail_block), real);

    float qs[R][E];
    float m[R];
    float l[R];
    float o[R][E];
    for (int r = 0; r < R; ++r) {
        const int64_t qrow = b * q_strides[0] + (kh * R + r) * q_strides[1];
        for (int i = 0; i < E; ++i) {
            qs[r][i] = scale * static_cast<float>(q[qrow + (e0 + i) * q_strides[3]]);
            o[r][i] = 0.0f;
        }
        m[r] = -metal::numeric_limits<float>::max();  // finite: fast math assumes no inf
        l[r] = 0.0f;
    }

    for (int t = first; t < last; ++t) {
        float k[E];
        float v[E];
        if (in_bulk) {
            falcon_dequantize_row<E, BITS, GROUP>(k, k_packed, k_packed_strides, k_scales,
                                                  k_scales_strides, k_biases, k_biases_strides,
                                                  b, kh, t, e0);
            falcon_dequantize_row<E, BITS, GROUP>(v, v_packed, v_packed_strides, v_scales,
                                                  v_scales_strides, v_biases, v_biases_strides,
                                                  b, kh, t, e0);
        } else {
            const int64_t krow = b * tail_k_strides[0] + kh * tail_k_strides[1] + t * tail_k_strides[2];
            const int64_t vrow = b * tail_v_strides[0] + kh * tail_v_strides[1] + t * tail_v_strides[2];
            for (int i = 0; i < E; ++i) {
                k[i] = static_cast<float>(tail_k[krow + (e0 + i) * tail_k_strides[3]]);
                v[i] = static_cast<float>(tail_v[vrow + (e0 + i) * tail_v_strides[3]]);
            }
        }
        for (int r = 0; r < R; ++r) {
            float s = 0.0f;
            for (int i = 0; i < E; ++i) {
                s += qs[r][i] * k[i];
            }
            s = simd_sum(s);
            const float m_new = metal::max(m[r], s);
            const float keep = metal::exp(m[r] - m_new);  // 0 at the first key
            const float p = metal::exp(s - m_new);
            l[r] = l[r] * keep + p;
            for (int i = 0; i < E; ++i) {
                o[r][i] = o[r][i] * keep + p * v[i];
            }
            m[r] = m_new;
        }
    }

    for (int r = 0; r < R; ++r) {
        const int64_t at = (int64_t(b) * Hkv * R + kh * R + r) * parts + part;
        for (int i = 0; i < E; ++i) {
            o_part[at * D + e0 + i] = o[r][i];
        }
        if (lane == 0) {
            ml_part[at * 2] = m[r];
            ml_part[at * 2 + 1] = l[r];
        }
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_quantized_decode_attention",
    input_names=["q", "k_packed", "k_scales", "k_biases", "v_packed", "v_scales", "v_biases",
                 "tail_k", "tail_v", "bulk_len", "tail_len", "scale", "bulk_block", "tail_block"],
    output_names=["o_part", "ml_part"],
    source=_SOURCE,
    header=_HEADER,
    ensure_row_contiguous=False,
)

_COMBINE_SOURCE = """
    // o_part: [B, Hq, P, D] float, ml_part: [B, Hq, P, 2] float (max, sum), pass
    // 1's outputs (row-contiguous). out: [B, Hq, 1, D] in T.
    const int lane = thread_index_in_simdgroup;
    const int64_t bh = thread_position_in_grid.y;
    const int P = o_part_shape[2];
    const int D = E * 32;
    float M = -metal::numeric_limits<float>::max();
    for (int p = lane; p < P; p += 32) {
        M = metal::max(M, ml_part[(bh * P + p) * 2]);
    }
    M = simd_max(M);
    float L = 0.0f;
    float acc[E];
    for (int i = 0; i < E; ++i) {
        acc[i] = 0.0f;
    }
    for (int p = 0; p < P; ++p) {
        const float w = metal::exp(ml_part[(bh * P + p) * 2] - M);  // 0 for an empty block
        L += w * ml_part[(bh * P + p) * 2 + 1];
        for (int i = 0; i < E; ++i) {
            acc[i] += w * o_part[(bh * P + p) * D + lane * E + i];
        }
    }
    for (int i = 0; i < E; ++i) {
        out[bh * D + lane * E + i] = static_cast<T>(acc[i] / L);
    }
"""

KERNEL_SPEC_COMBINE = dict(
    name="falcon_h1_quantized_decode_attention_combine",
    input_names=["o_part", "ml_part"],
    output_names=["out"],
    source=_COMBINE_SOURCE,
)


_KERNEL = build_metal_kernel(KERNEL_SPEC)
_KERNEL_COMBINE = build_metal_kernel(KERNEL_SPEC_COMBINE)


def _partition(capacity: int) -> Tuple[int, int]:
    """(keys per block, blocks) for `capacity` positions (see MIN_BLOCK)."""
    blocks = min(MAX_BLOCKS, max(1, math.ceil(capacity / MIN_BLOCK)))
    block = max(1, math.ceil(capacity / blocks))
    return block, math.ceil(capacity / block)


def _fits_kernel(q, keys, values, bulk_len, tail_keys, tail_values, tail_len, group_size,
                 bits) -> bool:
    """Whether quantized_decode_attention can take the Metal kernels for this call."""
    if q.ndim != 4 or tail_keys.ndim != 4 or len(keys) != 3 or len(values) != 3:
        return False
    b, hq, length, d = q.shape
    hkv = tail_keys.shape[1]
    if hkv < 1 or hq % hkv or length != 1 or d % 32 or not 32 <= d <= _MAX_HEAD_DIM:
        return False
    rows = (b, hkv, keys[0].shape[2])
    packed_shape = rows + (d * bits // 32,)
    group_shape = rows + (d // group_size,) if group_size else None
    return (
        _KERNEL is not None
        and _KERNEL_COMBINE is not None
        and kernels_enabled()
        and bits in _BITS
        and group_size in _GROUP_SIZES
        and d % group_size == 0
        and (hq // hkv) * (d // 32) <= _MAX_ROW_FLOATS
        and q.dtype in _FLOATS
        and all(x.shape == packed_shape and x.dtype == mx.uint32 for x in (keys[0], values[0]))
        and all(x.shape == group_shape and x.dtype == q.dtype for x in (*keys[1:], *values[1:]))
        and tail_keys.shape[:2] == (b, hkv) and tail_keys.shape[3] == d
        and tail_values.shape == tail_keys.shape
        and tail_keys.dtype == q.dtype and tail_values.dtype == q.dtype
        and bulk_len.shape == () and tail_len.shape == ()
    )


def _nonempty(keys, values, tail_keys, tail_values):
    """A capacity-0 bulk or tail as one unused position: the kernel takes no empty
    buffers (its length array, 0, keeps that position out)."""
    b, hkv, _, d = tail_keys.shape
    if keys[0].shape[2] == 0:
        keys = values = tuple(mx.zeros((b, hkv, 1, x.shape[3]), x.dtype) for x in keys)
    if tail_keys.shape[2] == 0:
        tail_keys = tail_values = mx.zeros((b, hkv, 1, d), tail_keys.dtype)
    return keys, values, tail_keys, tail_values


def _launch(kernel, combine, q, keys, values, bulk_len, tail_keys, tail_values, tail_len, scale,
            group_size, bits):
    b, hq, _, d = q.shape
    hkv, cb, ct = tail_keys.shape[1], keys[0].shape[2], tail_keys.shape[2]
    bulk_block, bulk_blocks = _partition(cb)
    tail_block, tail_blocks = _partition(ct)
    parts = bulk_blocks + tail_blocks
    e = d // 32
    o_part, ml_part = kernel(
        inputs=[q, *keys, *values, tail_keys, tail_values, bulk_len.astype(mx.int32),
                tail_len.astype(mx.int32), float(scale), bulk_block, tail_block],
        template=[("T", q.dtype), ("R", hq // hkv), ("E", e), ("BITS", bits),
                  ("GROUP", group_size)],
        grid=(32, parts, b * hkv),
        threadgroup=(32, min(_SIMDGROUPS, parts), 1),
        output_shapes=[(b, hq, parts, d), (b, hq, parts, 2)],
        output_dtypes=[mx.float32, mx.float32],
    )
    (out,) = combine(
        inputs=[o_part, ml_part],
        template=[("T", q.dtype), ("E", e)],
        grid=(32, b * hq, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(b, hq, 1, d)],
        output_dtypes=[q.dtype],
    )
    return out


def quantized_decode_attention_kernel(
    q: mx.array,
    keys: QuantizedArray,
    values: QuantizedArray,
    bulk_len: mx.array,
    tail_keys: mx.array,
    tail_values: mx.array,
    tail_len: mx.array,
    scale: float,
    group_size: int,
    bits: int,
) -> mx.array:
    # docstring: quantized_decode_attention_reference's (assigned below)
    if _KERNEL is None or _KERNEL_COMBINE is None:
        raise RuntimeError("quantized_decode_attention_kernel needs Metal; use "
                           "quantized_decode_attention")
    # No vjp: a quantized cache serves generation only (no gradient reaches it).
    keys, values, tail_keys, tail_values = _nonempty(keys, values, tail_keys, tail_values)
    return _launch(_KERNEL, _KERNEL_COMBINE, q, keys, values, bulk_len, tail_keys, tail_values,
                   tail_len, scale, group_size, bits)


def quantized_decode_attention(
    q: mx.array,
    keys: QuantizedArray,
    values: QuantizedArray,
    bulk_len: mx.array,
    tail_keys: mx.array,
    tail_values: mx.array,
    tail_len: mx.array,
    scale: float,
    group_size: int,
    bits: int,
) -> mx.array:
    # docstring: quantized_decode_attention_reference's (assigned below)
    args = (q, keys, values, bulk_len, tail_keys, tail_values, tail_len, scale, group_size, bits)
    if _fits_kernel(q, keys, values, bulk_len, tail_keys, tail_values, tail_len, group_size,
                    bits) and kernel_allowed(
            KERNEL_OP, dict(heads=q.shape[1], kv_heads=tail_keys.shape[1], head_dim=q.shape[3],
                            bits=bits, group_size=group_size, dtype=q.dtype)):
        return quantized_decode_attention_kernel(*args)
    return quantized_decode_attention_reference(*args)


quantized_decode_attention_kernel.__doc__ = quantized_decode_attention.__doc__ = (
    quantized_decode_attention_reference.__doc__)


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random quantized_decode_attention arguments; sizes: heads, kv_heads (default
    heads), head_dim, bits (default 4), group_size (default 64, or 32 where 64
    does not divide the head dim), dtype; and
    optionally bulk_capacity, bulk_len, tail_capacity, tail_len (defaults: a bulk
    of `length` real keys (None: 300) in a capacity rounded up to 256, and a tail
    of 37 real keys in 256). Keys and values are quantized from normal draws;
    values have mean 1, so that the output (a weighted mean) is of the values'
    size and a relative error measures the weights' error."""
    draw, dtype = RandomInputs(seed), sizes["dtype"]
    hq, d = sizes["heads"], sizes["head_dim"]
    hkv = sizes.get("kv_heads", hq)
    bits = sizes.get("bits", 4)
    group_size = sizes.get("group_size", 64 if d % 64 == 0 else 32)
    bulk_len = sizes.get("bulk_len", 300 if length is None else length)
    bulk_capacity = sizes.get("bulk_capacity", 256 * math.ceil(bulk_len / 256))
    tail_len = sizes.get("tail_len", 37)
    tail_capacity = sizes.get("tail_capacity", 256)

    def quantized(capacity, offset):
        if capacity == 0:
            return tuple(mx.zeros((batch, hkv, 0, w), t) for w, t in (
                (d * bits // 32, mx.uint32), (d // group_size, dtype), (d // group_size, dtype)))
        x = draw.normal(batch, hkv, capacity, d, dtype=dtype) + offset
        return tuple(mx.quantize(x, group_size=group_size, bits=bits))

    return dict(q=draw.normal(batch, hq, 1, d, dtype=dtype), keys=quantized(bulk_capacity, 0.0),
                values=quantized(bulk_capacity, 1.0), bulk_len=mx.array(bulk_len, mx.int32),
                tail_keys=draw.normal(batch, hkv, tail_capacity, d, dtype=dtype),
                tail_values=draw.normal(batch, hkv, tail_capacity, d, dtype=dtype) + 1.0,
                tail_len=mx.array(tail_len, mx.int32), scale=d ** -0.5, group_size=group_size,
                bits=bits)


KERNEL_OP = register(KernelOp(
    name="quantized_decode_attention", spec=KERNEL_SPEC,
    kernel=quantized_decode_attention_kernel, reference=quantized_decode_attention_reference,
    make_inputs=_random_inputs,
    more_specs=(KERNEL_SPEC_COMBINE,),
    # Kernel and reference compute the same float32 quantities (each K/V element
    # is scale * q + bias, one rounding, or none with an fma) in another order:
    # D-term dot products, an online softmax, sums over up to ~1300 keys here.
    # Rounding errors of random sign grow as sqrt(n) u (u = 2^-24): a score
    # (|s| <~ 5) off by ~5 sqrt(256) u = 5e-6 at D = 256, so a weight by ~1e-5
    # relative and the output, a mean of values of mean 1 and spread ~4 (make_inputs),
    # by ~4e-5 of max |out|, the sums adding sqrt(1300) u: 1e-4 for float32.
    # (On a GPU, fast math's exp, <= 3 + 1.5|x| ulp, adds ~2e-6 to a weight of
    # note, |x| <~ 20: within it. The emulator's exp is the C library's.)
    # Each side then rounds the output to q's dtype once, and such a difference
    # can flip that rounding: one ulp, at most 2^-10 (float16) and 2^-7 (bfloat16)
    # of max |out|. Measured (emulator, 36 random calls, D 64/128, up to 1280
    # keys): 2.3e-6, 4.1e-4 and 0.
    tolerance={mx.float32: 1e-4, mx.float16: 2e-3, mx.bfloat16: 1e-2}))
