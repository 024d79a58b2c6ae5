"""`linear(layer, x)`: the model's projections, with faster CPU forms.

Decode-sized inputs (at most _MATVEC_ROWS rows) of a float32 nn.Linear on the
CPU take the mat-vec form W @ x^T, in blocks of output rows of about
_MATVEC_BLOCK_BYTES, alternating between the current stream and a second CPU
stream, so the two cores stream the weights side by side. Measured on the
project's 2-core Linux machine (its memory reads ~26 GB/s on one core, ~30 on
two), 768 MB of 4096 x 1024 matrices: whole matrices 14 GB/s, 1024-row blocks on
one stream 15.8, 512-row (2 MB) blocks on two streams 23.8 (4 MB blocks: 15.4,
OpenBLAS then threads each call itself).

An nn.QuantizedLinear on the CPU with at least _DEQUANTIZE_ROWS[mode] rows
(prefill, evaluation, batches) runs as x @ dequantize(W)^T in float32, so BLAS
does the arithmetic: MLX's CPU quantized matmul handles one row well but costs
about one mat-vec per row beyond it (2048 x 1024, 4-bit affine, 2-core machine
under load: 1 row 1.5 ms, 16 rows 24-48 ms, 1024 rows 2.3 s; dequantize + BLAS:
4.8, 4.8 and 42 ms). The dequantized matrix lives for that one product: no
float copy of the weights is kept. MLX_FALCON_H1_DEQUANTIZE_MATMUL=0 (read at
each call; a compiled decode step keeps what it was traced with) keeps MLX's
quantized matmul for every row count.
"""

import os

import mlx.core as mx
import mlx.nn as nn

from . import blas

_MATVEC_ROWS = 4
_MATVEC_BLOCK_BYTES = 1 << 21
_SECOND_STREAM = mx.new_thread_local_stream(mx.cpu)  # each thread (server) gets its own

# Fewest rows for which dequantize + BLAS beats MLX's CPU quantized matmul, per
# mode; measured on a 2048 x 1024 matrix (2-core machine, medians of 7, quantized
# matmul time / dequantize + BLAS time, at load average ~1.4, then ~4). Affine and
# mxfp8 dequantize fast: 2 rows 0.89x (4-bit) to 1.56x (mxfp8), 3 rows 1.26-1.72x
# (under load 1.15-1.19x), 4 rows 1.6-2.9x, 8 rows 3.2x. MLX's fp4 dequantize is
# ~4x slower (12 ms) while its fp4 quantized matmul is faster: 16 rows 0.70-0.74x,
# 24 rows 1.04-1.08x, 32 rows 1.38-1.48x (under load 0.97-1.24x), 64 rows 2.8x.
# One row (decode) stays on the quantized matmul in every mode: 0.05-0.46x. With
# mlx[cpu]'s bundled reference BLAS (MLX_FALCON_H1_BLAS=0) the path is still taken
# and still pays for prefill: 4-bit, 8 rows 1.0x, 64 rows 1.25x, 256 rows 1.5x.
_DEQUANTIZE_ROWS = {"affine": 4, "mxfp8": 4, "mxfp4": 32, "nvfp4": 32}


def dequantize_matmul_enabled() -> bool:
    """False when MLX_FALCON_H1_DEQUANTIZE_MATMUL=0 (read at each call)."""
    return os.environ.get("MLX_FALCON_H1_DEQUANTIZE_MATMUL", "1").strip() != "0"


def dequantized_matmul(layer: nn.QuantizedLinear, x: mx.array) -> mx.array:
    """layer(x) as x @ dequantize(W)^T (+ bias), computed in float32 and returned
    in the dtype MLX's quantized matmul returns.

    Float32 throughout: MLX's CPU matmul hands only float32 to BLAS. For float32
    x the quantized matmul forms each weight scale * q + bias in float32, also
    from bfloat16 scales, so those are cast first (mx.dequantize computes in the
    scales' dtype and would round the weights to bfloat16: 5e-3 relative). For
    bfloat16 x it forms and sums everything in bfloat16; this is the float32
    result rounded once, closer to the exact product (the tests check both)."""
    scales, biases = layer.scales, layer.get("biases")
    if biases is not None:  # affine; the fp modes' scales are uint8 codes
        scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    w = mx.dequantize(layer.weight, scales, biases, group_size=layer.group_size,
                      bits=layer.bits, mode=layer.mode, dtype=mx.float32)  # fmt: skip
    y = x.astype(mx.float32) @ w.T
    # The quantized matmul's dtype: x's promoted with the affine scales' (two
    # different float dtypes promote to float32; the fp modes' scales are uint8
    # codes and do not count).
    out_dtype = x.dtype if biases is None or layer.biases.dtype == x.dtype else mx.float32
    y = y.astype(out_dtype)
    return y + layer.bias if "bias" in layer else y


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x); on the CPU, a float32 nn.Linear with a few rows runs as W @ x^T
    and an nn.QuantizedLinear with many rows as x @ dequantize(W)^T.

    Decode streams the weights once per token. For 1-4 rows, an optimized BLAS's
    mat-vec on ~2 MB row blocks spread over two streams reads them ~1.7x faster
    than MLX's x @ W^T does (see above). Other layers (LoRA, sharded), other
    dtypes, the GPU (where the quantized matmul is the fast path) and, for the
    mat-vec, the bundled BLAS call the layer.
    """
    rows = x.size // x.shape[-1]
    if mx.default_device() != mx.cpu:
        return layer(x)
    if type(layer) is nn.QuantizedLinear:
        if rows >= _DEQUANTIZE_ROWS.get(layer.mode, rows + 1) and dequantize_matmul_enabled():
            return dequantized_matmul(layer, x)
        return layer(x)
    if (
        rows > _MATVEC_ROWS
        or type(layer) is not nn.Linear
        or layer.weight.dtype != mx.float32
        or x.dtype != mx.float32
        # With mlx[cpu]'s bundled reference BLAS this form is 2.3x slower than
        # MLX's own (0.5B decode: 0.97 vs 2.19 tok/s); it pays with OpenBLAS.
        or not blas.optimized()
    ):
        return layer(x)
    w = layer.weight
    # v is (D, rows), 2-D: a 1-D vector costs an expand and a squeeze per block.
    v = x.reshape(-1, 1) if rows == 1 else x.reshape(rows, -1).T
    block = max(64, _MATVEC_BLOCK_BYTES // (4 * w.shape[1]))
    y = [
        mx.matmul(w[i : i + block], v, stream=_SECOND_STREAM if n % 2 else None)
        for n, i in enumerate(range(0, w.shape[0], block))
    ]
    y = y[0] if len(y) == 1 else mx.concatenate(y, axis=0)
    y = (y if rows == 1 else y.T).reshape(*x.shape[:-1], -1)
    return y + layer.bias if "bias" in layer else y
