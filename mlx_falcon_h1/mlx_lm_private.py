"""Everything that reads or writes mlx-lm's private names: read from mlx-lm 0.32.2.

The compiled decode step (decode.py) writes one token's keys and values into
mlx-lm's K/V buffers itself, so it has to do the bookkeeping that each cache's
update_and_fetch does privately (write positions `_idx`, a rotating buffer's
`_trim`), and it must know a batch cache still taking right-padded prompts
(`_right_padding`). FalconH1Cache builds on mlx-lm's cache base class
(`_BaseCache`: from_state, meta_state, as load_prompt_cache expects). When mlx-lm
changes these, this module is the one to follow; tests/test_compiled_decode.py,
test_max_kv_size.py and test_generation_paths.py exercise every line of it.
"""

from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, RotatingKVCache
from mlx_lm.models.cache import _BaseCache as BaseCache  # noqa: F401  (cache.py's base)
# Sizes as mlx-lm's --prompt-cache-bytes takes them (10GB, 500M): server.py's size flag.
from mlx_lm.utils import _parse_size as parse_size  # noqa: F401


def kv_signature(kv) -> Optional[tuple]:
    """What every layer's K/V cache must share for one compiled step (its kind and
    write position, and for a bounded one its bound), or None for one the step
    cannot take: another cache class (--kv-bits K/V is quantized_kv.py's, which
    answers for itself), or a batch still taking right-padded prompts."""
    kind = type(kv)
    if kind is KVCache:
        return kind, kv.offset
    if kind is BatchKVCache and kv._right_padding is None:
        return kind, kv._idx
    if kind is RotatingKVCache:  # --max-kv-size
        return kind, kv.offset, kv._idx, kv.max_size, kv.keep
    return None


def make_room(kv) -> Tuple[int, int]:
    """Room in the K/V buffers for one more token, made as update_and_fetch would
    (grown as KVCache grows them; for a bounded K/V as RotatingKVCache makes room).
    Returns (the buffer position this token's K/V goes to, how many buffer
    positions then hold keys)."""
    if isinstance(kv, RotatingKVCache):
        return _make_room_in_rotating(kv)
    used = kv._idx if isinstance(kv, BatchKVCache) else kv.offset
    capacity = kv.keys.shape[2]
    # Capacities are kept at multiples of the step (batch merges leave other
    # sizes), so the compiled step meets few distinct shapes: one trace each.
    if used + 1 > capacity or capacity % kv.step:
        target = (used // kv.step + 1) * kv.step

        def grow(a):
            a = a[..., :used, :]
            pad = mx.zeros(a.shape[:2] + (target - used, a.shape[3]), a.dtype)
            return mx.concatenate([a, pad], axis=2)

        kv.keys, kv.values = grow(kv.keys), grow(kv.values)
    return used, used + 1


def _make_room_in_rotating(kv: RotatingKVCache) -> Tuple[int, int]:
    """What RotatingKVCache does before writing one token in place (grow the buffer
    up to max_size, cut a prompt's longer buffer down to it, wrap around past the
    kept first tokens)."""
    prev = kv.offset
    size = kv.keys.shape[2]
    if prev >= size and size < kv.max_size:
        more = min(kv.step, kv.max_size - prev)
        pad = lambda a: mx.concatenate([a, mx.zeros(a.shape[:2] + (more, a.shape[3]), a.dtype)], axis=2)
        kv.keys, kv.values, kv._idx = pad(kv.keys), pad(kv.values), prev
    excess = kv.keys.shape[2] - kv.max_size
    if excess > 0:
        kv.keys, kv.values, kv._idx = kv._trim(excess, kv.keys), kv._trim(excess, kv.values), kv.max_size
    if kv._idx == kv.max_size:
        kv._idx = kv.keep
    # Until the buffer first fills, positions are in order and those past this
    # token's are empty; once full, every position holds a kept key.
    return kv._idx, min(prev + 1, kv.keys.shape[2])


def store_step(kv, keys, values) -> None:
    """The compiled step's new K/V buffers (one more token written into them)."""
    kv.keys, kv.values = keys, values
    kv.offset = kv.offset + 1  # an int, or per row in a batch
    if isinstance(kv, (BatchKVCache, RotatingKVCache)):
        kv._idx += 1
