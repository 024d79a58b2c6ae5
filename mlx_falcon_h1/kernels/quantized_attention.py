"""STAND-IN, to be replaced at merge by the real module (another helper writes it):
one query's attention over a quantized K/V bulk and a float tail of the newest keys.

Legend: B batch, Hq query heads, Hkv key/value heads (Hq = R * Hkv), Cb the
bulk's capacity, Ct the tail's, D head dim.

Only the interface and a pure-MLX reference are here, so that the cache and the
compiled step (quantized_kv.py, decode.py) can be built and tested against it.
The real module launches two Metal passes (partial softmax per block of keys,
then their combination); `_KERNEL` and `_KERNEL_COMBINE` stand for them. They
are None here (no Metal source): launch_count.as_on_a_mac patches every
`_KERNEL*` attribute with a counting stand-in, and only then does the dispatcher
below take the two-launch path, to count a step as it will be with the real one.
"""

import mlx.core as mx

_KERNEL = None
_KERNEL_COMBINE = None


def quantized_decode_attention_reference(q, keys, values, bulk_len, tail_keys, tail_values, tail_len,
                                         scale, group_size, bits):
    """softmax(scale q k^T) v over the bulk's first bulk_len keys and the tail's first tail_len.

    Args:
        q: (B, Hq, 1, D).
        keys, values: the bulk's whole buffers, mlx-lm's QuantizedKVCache triples
            (packed (B, Hkv, Cb, D * bits / 32) uint32, scales and biases (B, Hkv, Cb, D / group_size)).
        bulk_len: int32 (): how many leading bulk positions hold keys.
        tail_keys, tail_values: (B, Hkv, Ct, D) float, the newest keys.
        tail_len: int32 (): how many leading tail positions hold keys.
        scale: the score scale; group_size, bits: the bulk's quantization.

    Returns:
        (B, Hq, 1, D) in q's dtype.
    """
    b, hq, _, d = q.shape
    hkv = tail_keys.shape[1]
    # The R query heads of a K/V head side by side: (B, Hkv, R, D), one matmul per K/V head.
    qr = (q * scale).reshape(b, hkv, hq // hkv, d)
    bulk = mx.quantized_matmul(qr, *keys, transpose=True, group_size=group_size, bits=bits)  # (B, Hkv, R, Cb)
    tail = qr @ tail_keys.swapaxes(-1, -2)  # (B, Hkv, R, Ct)
    bulk = mx.where(mx.arange(bulk.shape[-1]) < bulk_len, bulk.astype(mx.float32), -mx.inf)
    tail = mx.where(mx.arange(tail.shape[-1]) < tail_len, tail.astype(mx.float32), -mx.inf)
    p = mx.softmax(mx.concatenate([bulk, tail], axis=-1), axis=-1)
    p_bulk, p_tail = mx.split(p.astype(q.dtype), [bulk.shape[-1]], axis=-1)
    out = mx.quantized_matmul(p_bulk, *values, transpose=False, group_size=group_size, bits=bits)
    out = out + p_tail @ tail_values
    return out.reshape(b, hq, 1, d).astype(q.dtype)


def quantized_decode_attention(q, keys, values, bulk_len, tail_keys, tail_values, tail_len,
                               scale, group_size, bits):
    # docstring: the reference's (assigned below)
    if _KERNEL is not None and _KERNEL_COMBINE is not None:  # launch_count's stand-ins only
        b, hq, _, d = q.shape
        inputs = [q, *keys, *values, bulk_len, tail_keys, tail_values, tail_len]
        partial = _KERNEL(inputs=inputs, output_shapes=[(b, hq, 1, d + 2)], output_dtypes=[mx.float32],
                          grid=(1, 1, 1), threadgroup=(1, 1, 1))[0]
        return _KERNEL_COMBINE(inputs=[partial], output_shapes=[q.shape], output_dtypes=[q.dtype],
                               grid=(1, 1, 1), threadgroup=(1, 1, 1))[0]
    return quantized_decode_attention_reference(q, keys, values, bulk_len, tail_keys, tail_values,
                                                tail_len, scale, group_size, bits)


quantized_decode_attention.__doc__ = quantized_decode_attention_reference.__doc__
