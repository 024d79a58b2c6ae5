"""--kv-bits: the attention K/V quantized, its newest tokens kept in float.

mlx-lm's QuantizedKVCache quantizes each token's keys and values as they come:
on a Mac a decode step then launches mx.quantize twice and writes six arrays
(packed, scales and biases of K and V) per layer. Here the newest tokens' K/V
stay float in a small *tail* (TAIL_TOKENS positions), written as the float
cache writes them (one slice update each for K and V), and are quantized into
the *bulk* (a QuantizedKVCache: mlx-lm's layout, mx.quantize's values) only
when the tail is full, once per TAIL_TOKENS tokens, eagerly, outside the
compiled step (decode.py). A call of several tokens (a prompt chunk,
speculative decoding's check) first moves the tail into the bulk, then is
mlx-lm's quantized cache and attention. One query attends over both
(kernels/quantized_attention.py).

What a user gets: the newest 1 to TAIL_TOKENS tokens (since the last flush) are
attended in float, all older ones with the bits. Each token is quantized on its
own (groups along the head dim), so when it is quantized does not change its
quantized values: a file written (the tail quantized into it, mlx-lm's format)
and read back is the cache flushed at that point.

Legend: B batch, Hkv key/value heads, Ct the tail's capacity, D head dim.
"""

from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.models.base import quantized_scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, QuantizedKVCache, create_attention_mask

from .kernels.quantized_attention import quantized_decode_attention
from .kv_quantization import check_kv_quantization

# The tail's capacity: mlx-lm's K/V buffer step (KVCache.step, 256 in 0.32), so
# the bulk grows, and the compiled step retraces, as often as a float cache's.
TAIL_TOKENS = 256


class QuantizedKVWithTail(QuantizedKVCache):
    """A layer's quantized K/V: `bulk` (a QuantizedKVCache) and the float `tail` after it.

    Seen from outside it is mlx-lm's QuantizedKVCache, a subclass of it (offset,
    bits, group_size, trim, nbytes, make_mask, and a `state` in its format with
    the tail quantized in; `mlx_lm()` is that cache). It holds its tokens in
    `bulk` and the tail, not in the attributes QuantizedKVCache's own methods
    write: every method of the protocol is its own."""

    tail_capacity = TAIL_TOKENS

    def __init__(self, group_size: int = 64, bits: int = 8, bulk: Optional[QuantizedKVCache] = None):
        self.bulk = QuantizedKVCache(group_size=group_size, bits=bits) if bulk is None else bulk
        self.tail_keys: Optional[mx.array] = None  # (B, Hkv, Ct, D) float
        self.tail_values: Optional[mx.array] = None
        self.tail_len = 0  # how many leading tail positions hold keys

    @classmethod
    def from_float(cls, kv: KVCache, group_size: int, bits: int) -> "QuantizedKVWithTail":
        """The whole float K/V quantized into the bulk (as mlx-lm's to_quantized does)."""
        if kv.keys is not None:  # a clear error, not mx.quantize's (or a crash: group size 0)
            check_kv_quantization(kv.keys.shape[-1], bits, group_size)
        store = cls(bulk=kv.to_quantized(group_size=group_size, bits=bits))
        if kv.keys is not None:
            store._allocate_tail(kv.keys[:, :, :1], kv.values[:, :, :1])
        return store

    # --- mlx-lm's cache interface ----------------------------------------------

    @property
    def offset(self) -> int:
        return self.bulk.offset + self.tail_len

    @property
    def bits(self) -> int:
        return self.bulk.bits

    @property
    def group_size(self) -> int:
        return self.bulk.group_size

    @property
    def keys(self):
        """The bulk's key triple (packed, scales, biases), None before any."""
        return self.bulk.keys

    @property
    def values(self):
        return self.bulk.values

    def update_and_fetch(self, keys, values):
        """keys, values: (B, Hkv, L, D). One token goes into the tail and comes back as
        whole_buffers' pairs; more first move the tail into the bulk, then are
        mlx-lm's QuantizedKVCache's (the bulk's quantized K/V, offset keys)."""
        if self.tail_keys is None and self.bulk.empty():  # the first keys: are they quantizable?
            check_kv_quantization(keys.shape[-1], self.bits, self.group_size)
        if keys.shape[2] != 1:
            self.flush()
            return self.bulk.update_and_fetch(keys, values)
        if self.tail_keys is None:
            self._allocate_tail(keys, values)
        at, _ = self.make_room()
        at = mx.array([at])
        self.take_step(mx.slice_update(self.tail_keys, keys, at, axes=(2,)),
                       mx.slice_update(self.tail_values, values, at, axes=(2,)))
        return self.whole_buffers()[:2]

    def whole_buffers(self) -> Tuple:
        """((bulk keys, tail keys), (bulk values, tail values), (bulk_len, tail_len)):
        what one query attends over (quantized_kv_attention), the lengths int32 ()."""
        return ((self.bulk.keys, self.tail_keys), (self.bulk.values, self.tail_values),
                (mx.array(self.bulk.offset, mx.int32), mx.array(self.tail_len, mx.int32)))

    def flush(self) -> None:
        """Quantize the tail's tokens into the bulk (the tail's buffers are reused)."""
        if self.tail_len:
            n = self.tail_len
            self.tail_len = 0
            self.bulk.update_and_fetch(self.tail_keys[:, :, :n], self.tail_values[:, :, :n])

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Take back the newest n tokens: from the tail, then (as QuantizedKVCache) the bulk."""
        n = min(self.offset, n)
        from_tail = min(n, self.tail_len)
        self.tail_len -= from_tail
        self.bulk.trim(n - from_tail)
        return n

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.bulk.empty() and self.tail_keys is None

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)

    @property
    def nbytes(self) -> int:
        tail = 0 if self.tail_keys is None else self.tail_keys.nbytes + self.tail_values.nbytes
        return (0 if self.bulk.empty() else self.bulk.nbytes) + tail

    def mlx_lm(self) -> QuantizedKVCache:
        """mlx-lm's QuantizedKVCache of the same tokens, the tail quantized into a copy
        (this cache is left as it is; with an empty tail, the bulk itself): what
        prompt-cache files hold."""
        if not self.tail_len:
            return self.bulk
        n, used = self.tail_len, self.bulk.offset
        quantize = lambda a: mx.quantize(a[:, :, :n], group_size=self.group_size, bits=self.bits)  # noqa: E731
        joined = []
        for bulk, tail in ((self.bulk.keys, self.tail_keys), (self.bulk.values, self.tail_values)):
            joined.append(tuple(mx.concatenate([b[:, :, :used], t], axis=2) for b, t in zip(bulk, quantize(tail))))
        copy = QuantizedKVCache(group_size=self.group_size, bits=self.bits)
        copy.keys, copy.values, copy.offset = joined[0], joined[1], self.offset
        return copy

    @property
    def state(self):
        return self.mlx_lm().state

    def arrays(self) -> list:
        """Every array it holds, as they are (no tail quantized in: `state` would)."""
        bulk = [] if self.bulk.empty() else [*self.bulk.keys, *self.bulk.values]
        return bulk + [a for a in (self.tail_keys, self.tail_values) if a is not None]

    # --- the compiled decode step (decode.py) --------------------------------------

    def step_signature(self) -> Optional[tuple]:
        """What every layer's K/V must share for one compiled step; None before both
        bulk and tail exist (the first calls run uncompiled and make them)."""
        if self.tail_keys is None or self.bulk.empty():
            return None
        return type(self), self.bulk.offset, self.tail_len, self.bits, self.group_size

    def make_room(self) -> Tuple[int, int]:
        """Before a token is written: a full tail moved into the bulk. Returns (the tail
        position the token goes to, how many tail positions then hold keys)."""
        if self.tail_len == self.tail_keys.shape[2]:
            self.flush()
        return self.tail_len, self.tail_len + 1

    def step_state(self) -> Tuple:
        """(keys, values) as the step takes them: (bulk triple, tail) each."""
        return (self.bulk.keys, self.tail_keys), (self.bulk.values, self.tail_values)

    def take_step(self, tail_keys: mx.array, tail_values: mx.array) -> None:
        """The tail with one more token written (after make_room)."""
        self.tail_keys, self.tail_values = tail_keys, tail_values
        self.tail_len += 1

    def _allocate_tail(self, keys: mx.array, values: mx.array) -> None:
        """Zero tail buffers shaped and typed like keys, values (B, Hkv, _, D); and, with
        no bulk yet, an empty one of QuantizedKVCache's first size (one query reads both)."""
        b, h, _, d = keys.shape
        self.tail_keys = mx.zeros((b, h, self.tail_capacity, d), keys.dtype)
        self.tail_values = mx.zeros((b, h, self.tail_capacity, values.shape[3]), values.dtype)
        self.tail_len = 0
        if self.bulk.empty():
            def empty(x):
                rows = (b, h, QuantizedKVCache.step)
                return (mx.zeros(rows + (x.shape[3] * self.bits // 32,), mx.uint32),
                        mx.zeros(rows + (x.shape[3] // self.group_size,), x.dtype),
                        mx.zeros(rows + (x.shape[3] // self.group_size,), x.dtype))

            self.bulk.keys, self.bulk.values = empty(keys), empty(values)


def quantized_kv_attention(q, keys, values, real, mask, scale: float, group_size: int, bits: int):
    """Attention over a quantized K/V. One query over whole buffers (`real` given: the
    pairs and lengths of QuantizedKVWithTail.whole_buffers) reads the bulk and the
    float tail; several read update_and_fetch's keys with mlx-lm's quantized attention."""
    if real is None:
        return quantized_scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask,
                                                      group_size=group_size, bits=bits)
    (bulk_keys, tail_keys), (bulk_values, tail_values), (bulk_len, tail_len) = keys, values, real
    return quantized_decode_attention(q, bulk_keys, bulk_values, bulk_len, tail_keys, tail_values,
                                      tail_len, scale, group_size, bits)
