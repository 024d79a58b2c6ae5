"""`linear(layer, x)`: the model's projections, with a faster CPU form for decode.

Decode-sized inputs (at most _MATVEC_ROWS rows) of a float32 nn.Linear on the
CPU take the mat-vec form W @ x^T, in blocks of output rows of about
_MATVEC_BLOCK_BYTES, alternating between the current stream and a second CPU
stream, so the two cores stream the weights side by side. Measured on the
project's 2-core Linux machine (its memory reads ~26 GB/s on one core, ~30 on
two), 768 MB of 4096 x 1024 matrices: whole matrices 14 GB/s, 1024-row blocks on
one stream 15.8, 512-row (2 MB) blocks on two streams 23.8 (4 MB blocks: 15.4,
OpenBLAS then threads each call itself).
"""

import mlx.core as mx
import mlx.nn as nn

from . import blas

_MATVEC_ROWS = 4
_MATVEC_BLOCK_BYTES = 1 << 21
_SECOND_STREAM = mx.new_thread_local_stream(mx.cpu)  # each thread (server) gets its own


def linear(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x); on the CPU a float32 nn.Linear with a few rows runs as W @ x^T.

    Decode streams the weights once per token. For 1-4 rows, an optimized BLAS's
    mat-vec on ~2 MB row blocks spread over two streams reads them ~1.7x faster
    than MLX's x @ W^T does (see above). Quantized and LoRA layers, other
    dtypes, the GPU and the bundled BLAS call the layer.
    """
    rows = x.size // x.shape[-1]
    if (
        rows > _MATVEC_ROWS
        or type(layer) is not nn.Linear
        or layer.weight.dtype != mx.float32
        or x.dtype != mx.float32
        or mx.default_device() != mx.cpu
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
