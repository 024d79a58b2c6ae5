"""The per-layer cache of a Falcon-H1 layer: attention K/V, conv state, SSM state.

Every Falcon-H1 layer runs attention and a Mamba2 mixer side by side, so one
cache object holds both kinds of memory and implements mlx-lm's cache protocol
for both: to mlx-lm's attention helpers it is a KV cache (`update_and_fetch`,
`offset`, `make_mask`, `bits` once quantized); batch generation merges, filters,
extends and extracts it; prompt-cache files save and load it; and it can be
trimmed, which an SSM cache cannot do by itself.

Trimming. The SSM state at an earlier position cannot be recovered from the
current one. So the cache keeps a rollback window: the SSM state at the window's
start and the raw mixer inputs ([xBC | dt] rows) of the window's tokens (plus the
K-1 rows before it, the conv's left context). Trimming n <= `trimmable` tokens
cuts the window and replays the kept rows from the window's start state, at the
next forward call, which has the layer's weights. The window holds between
`max_rollback` and 2 * `max_rollback` tokens once that many have been seen; it
costs (conv_dim + H) values per token and one SSM state per layer, about 1/60 of
the rollback a stored state per token would cost.

Bounded attention (--max-kv-size N). The attention K/V is then mlx-lm's
RotatingKVCache(max_size=N, keep=4), as mlx-lm gives every model without a
cache of its own: the first 4 tokens and the latest ones are kept, the oldest
others overwritten. Only attention forgets: the conv and SSM state still carry
the whole context, as mlx-swift-lm's Falcon-H1 does. It is an approximation of
the model (attention no longer sees every token). Once the window is full the
K/V cannot be trimmed (its oldest keys are gone) and --kv-bits is refused
(mlx-lm cannot quantize a rotating cache).

Legend: B batch, L tokens, C conv channels, H SSM heads, P head dim, N state
size, K conv width.
"""

from typing import List, Optional

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
from mlx_lm.models.cache import (
    BatchKVCache,
    BatchRotatingKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    _BaseCache,
)

class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be read, or does not fit the model it is used with."""


# Speculative decoding trims at most --num-draft-tokens; chat templates that
# re-render a reply trim a few tokens. Larger windows cost memory (see above).
MAX_ROLLBACK_TOKENS = 32

# --max-kv-size keeps the first tokens too, as mlx-lm's make_prompt_cache does:
# attention sinks, which models lean on (the BOS token takes much attention).
KEEP_TOKENS = 4


class FalconH1Cache(_BaseCache):
    def __init__(self, max_rollback: int = MAX_ROLLBACK_TOKENS, max_kv_size: Optional[int] = None):
        if max_kv_size is None:
            self.kv = KVCache()
        else:
            if isinstance(max_kv_size, bool) or not isinstance(max_kv_size, int) or max_kv_size <= KEEP_TOKENS:
                raise ValueError(
                    f"max_kv_size must be an integer above {KEEP_TOKENS} (the first {KEEP_TOKENS} "
                    f"tokens are always kept), got {max_kv_size!r}")
            self.kv = RotatingKVCache(max_size=max_kv_size, keep=KEEP_TOKENS)
        self.conv_state: Optional[mx.array] = None  # (B, K-1, C) raw conv inputs
        self.ssm_state: Optional[mx.array] = None  # (B, H, P, N) float32
        # Right-padded batch prompts (mlx-lm's BatchGenerator): real tokens still
        # to come per row; padded positions must not touch conv or SSM state.
        self.lengths: Optional[mx.array] = None  # (B,)
        self.max_rollback = max_rollback
        self.window = 0  # tokens in the rollback window
        self.window_state: Optional[mx.array] = None  # SSM state at the window start
        self.history: Optional[mx.array] = None  # (B, K-1 + window, C + H) raw [xBC | dt]
        self.replay_to: Optional[int] = None  # pending rollback: recompute the state
        # Loaded from a file (from_state): its sizes are checked against the layer
        # at the first call, so that a cache made for another model or
        # configuration fails with the mismatch named, not deep in a matmul.
        self.unverified_mixer = self.unverified_kv = False

    # --- attention side: mlx-lm's KV caches do the work -------------------------

    @property
    def offset(self):
        return self.kv.offset

    def update_and_fetch(self, keys, values):
        if self.unverified_kv:
            self._check_attention(keys)
        return self.kv.update_and_fetch(keys, values)

    def whole_buffers(self):
        """(keys, values, valid): the K/V buffers after update_and_fetch, of which the
        first `valid` positions are real; None unless a plain KVCache holds them.
        One-token attention reads these: a view of their first keys would be
        copied by every matmul that reads it."""
        if type(self.kv) is not KVCache:
            return None
        return self.kv.keys, self.kv.values, self.kv.offset

    def make_mask(self, *args, **kwargs):
        return self.kv.make_mask(*args, **kwargs)

    @property
    def bits(self):  # present only when quantized: mlx-lm's attention checks hasattr
        if not isinstance(self.kv, QuantizedKVCache):
            raise AttributeError("bits")
        return self.kv.bits

    @property
    def group_size(self):
        if not isinstance(self.kv, QuantizedKVCache):
            raise AttributeError("group_size")
        return self.kv.group_size

    @property
    def max_kv_size(self) -> Optional[int]:
        """The attention window (--max-kv-size), or None for the whole context."""
        return getattr(self.kv, "max_size", None)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "FalconH1Cache":
        """--kv-bits: quantize the attention K/V; conv and SSM state stay as they are."""
        if self.max_kv_size is not None:
            raise ValueError(
                f"--kv-bits cannot be combined with --max-kv-size ({self.max_kv_size}): mlx-lm "
                "cannot quantize a bounded (rotating) K/V cache; use one or the other")
        if isinstance(self.kv, KVCache):
            self.kv = self.kv.to_quantized(group_size=group_size, bits=bits)
        return self

    def size(self):
        return self.kv.size()

    def empty(self):
        return self.kv.empty() and self.ssm_state is None

    @property
    def nbytes(self):
        arrays = [self.conv_state, self.ssm_state, self.window_state, self.history]
        return self.kv.nbytes + sum(a.nbytes for a in arrays if a is not None)

    # --- mixer side -------------------------------------------------------------

    def run_mixer(self, mixer, xBC: mx.array, dt: mx.array, rows: mx.array) -> mx.array:
        """Run `mixer.ssm` on this call's raw xBC (B, L, C) and dt (B, L, H) from
        the cached state, keep the new state and the rollback window; return y.
        rows: the same values as one (B, L, C + H) array, [xBC | dt]."""
        width = mixer.conv_width
        if self.unverified_mixer:
            _check_fits(self, mixer_sizes(mixer), "this model")
        if self.replay_to is not None:
            self.ssm_state = self._replay(mixer, self.replay_to)
            self.replay_to = None
        batch, length, channels = xBC.shape

        if self.lengths is not None:
            y, self.conv_state, self.ssm_state = mixer.ssm(
                xBC, dt, self.conv_state, self.ssm_state, self.lengths
            )
            self.lengths = self.lengths - length
            self._reset_window()  # rows end at different places: no common window
            return self._with_state(y)

        if self.conv_state is None:
            self.conv_state = mx.zeros((batch, width - 1, channels), dtype=xBC.dtype)
        if self.history is None:
            self.history = self._context_rows(self.conv_state, dt)
        if length > self.max_rollback:
            # Long call (a prompt): split it where the new window starts, so the
            # window's start state comes out of the scan instead of a replay.
            cut = length - self.max_rollback
            rows = rows[:, cut:]
            y0, conv_state, state = mixer.ssm(xBC[:, :cut], dt[:, :cut], self.conv_state, self.ssm_state)
            y1, self.conv_state, self.ssm_state = mixer.ssm(xBC[:, cut:], dt[:, cut:], conv_state, state)
            self.window_state = state
            self.history = mx.concatenate([self._context_rows(conv_state, dt), rows], axis=1)
            self.window = self.max_rollback
            return self._with_state(mx.concatenate([y0, y1], axis=1))

        y, self.conv_state, self.ssm_state = mixer.ssm(xBC, dt, self.conv_state, self.ssm_state)
        self._extend_window(mixer, rows)
        return y  # a few tokens: their inputs are small, nothing worth computing early

    def _with_state(self, y: mx.array) -> mx.array:
        """y, made to depend on the new cache arrays, so that evaluating the layer's
        output computes them too. Otherwise they wait for the end of the step
        (mlx-lm evaluates the cache after the logits), and each holds this
        layer's whole mixer input (in_proj's output, the padded conv input) of
        the step alive until then: every layer's at once."""
        state = [a for a in (self.conv_state, self.ssm_state, self.history) if a is not None]
        return mx.depends([y], state)[0]

    def _extend_window(self, mixer, rows: mx.array) -> None:
        """Append this call's raw [xBC | dt] rows (B, L, C + H) to the rollback window."""
        self.history = mx.concatenate([self.history, rows], axis=1)
        self.window += rows.shape[1]
        if self.window > 2 * self.max_rollback:
            # Move the window start forward by one replay of the oldest rows,
            # once per max_rollback tokens of decoding.
            drop = self.window - self.max_rollback
            self.window_state = self._replay(mixer, drop)
            self.history = self.history[:, drop:]
            self.window = self.max_rollback

    def _context_rows(self, conv_state: mx.array, dt: mx.array) -> mx.array:
        # The K-1 conv-context rows before the window; their dt columns are unused.
        pad = mx.zeros(conv_state.shape[:2] + (dt.shape[-1],), dtype=conv_state.dtype)
        return mx.concatenate([conv_state, pad], axis=-1)

    def _reset_window(self):
        self.window, self.window_state, self.history = 0, self.ssm_state, None

    def _replay(self, mixer, tokens: int) -> Optional[mx.array]:
        """The SSM state after the window's first `tokens` tokens."""
        if tokens == 0:
            return self.window_state
        k = mixer.conv_width - 1
        channels = self.conv_state.shape[-1]
        rows = self.history[:, k : k + tokens]
        _, _, state = mixer.ssm(
            rows[..., :channels],
            rows[..., channels:],
            self.history[:, :k, :channels],
            self.window_state,
        )
        return state

    # --- the compiled decode step (decode.py) ----------------------------------

    def prepare_decode(self, mixer):
        """Before a compiled step, eagerly: a pending rollback replayed, and room in
        the K/V buffers for one more token (grown as KVCache grows them, or for a
        bounded K/V as RotatingKVCache makes room). Returns (where this token's
        K/V goes, how many buffer positions are then valid)."""
        if self.replay_to is not None:
            self.ssm_state = self._replay(mixer, self.replay_to)
            self.replay_to = None
        kv = self.kv
        if isinstance(kv, RotatingKVCache):
            return _make_room_in_window(kv)
        used = kv._idx if isinstance(kv, BatchKVCache) else kv.offset
        quantized = isinstance(kv, QuantizedKVCache)  # (packed, scales, biases) triples
        capacity = (kv.keys[0] if quantized else kv.keys).shape[2]
        # Capacities are kept at multiples of the step (batch merges leave other
        # sizes), so the compiled step meets few distinct shapes: one trace each.
        if used + 1 > capacity or capacity % kv.step:
            target = (used // kv.step + 1) * kv.step

            def grow(a):
                a = a[..., :used, :]
                pad = mx.zeros(a.shape[:2] + (target - used, a.shape[3]), a.dtype)
                return mx.concatenate([a, pad], axis=2)

            if quantized:
                kv.keys, kv.values = tuple(map(grow, kv.keys)), tuple(map(grow, kv.values))
            else:
                kv.keys, kv.values = grow(kv.keys), grow(kv.values)
        return used, used + 1

    def decode_state(self):
        return self.kv.keys, self.kv.values, self.conv_state, self.ssm_state

    def take_decode_state(self, mixer, keys, values, conv_state, ssm_state, rows) -> None:
        """After a compiled step: its new buffers and states, one more token."""
        if isinstance(self.kv, QuantizedKVCache):
            keys, values = tuple(keys), tuple(values)
        self.kv.keys, self.kv.values = keys, values
        self.kv.offset = self.kv.offset + 1  # an int, or per row in a batch
        if isinstance(self.kv, (BatchKVCache, RotatingKVCache)):
            self.kv._idx += 1
        self.conv_state, self.ssm_state = conv_state, ssm_state
        self._extend_window(mixer, rows)

    # --- trimming (speculative decoding, prompt-cache prefix reuse) -------------

    def is_trimmable(self):
        # False while stored in the server's prompt cache (see commands.py).
        return not getattr(self, "stored", False)

    @property
    def trimmable(self) -> int:
        """How many tokens `trim` can take back now."""
        if self.lengths is not None or not self.kv.is_trimmable():
            return 0  # a bounded K/V that has overwritten keys cannot go back
        return min(self.window, self.kv.size())

    def trim(self, n: int) -> int:
        if n <= 0:
            return 0
        if n > self.trimmable and not self.kv.is_trimmable():
            raise ValueError(
                f"Falcon-H1 cache: cannot take back {n} tokens: the attention K/V is bounded "
                f"(--max-kv-size {self.max_kv_size}) and full, its oldest keys overwritten")
        if n > self.trimmable:
            raise ValueError(
                f"Falcon-H1 cache: cannot roll the SSM state back {n} tokens; "
                f"{self.trimmable} can be (set model.rollback_tokens before make_cache() "
                "for a longer window)"
            )
        self.kv.trim(n)
        self.window -= n
        k = self.conv_state.shape[1]
        channels = self.conv_state.shape[-1]
        self.history = self.history[:, : k + self.window]
        self.conv_state = self.history[:, self.window :, :channels]
        self.replay_to = self.window
        return n

    # --- prompt-cache files -----------------------------------------------------

    @property
    def state(self):
        # Every array, so mlx-lm evaluates all of them after each step, plus what
        # rebuilds the object (load_prompt_cache calls from_state with this list).
        return [
            type(self.kv).__name__,
            self.kv.state,
            self.conv_state,
            self.ssm_state,
            self.window_state,
            self.history,
            self.lengths,
            self.window,
            self.max_rollback,
            -1 if self.replay_to is None else self.replay_to,
        ]

    @state.setter
    def state(self, v):
        kv_class, kv_state, *arrays, self.window, self.max_rollback, replay_to = v
        self.kv = getattr(mlx_lm_cache, kv_class).from_state(kv_state)
        self.conv_state, self.ssm_state, self.window_state, self.history, self.lengths = arrays
        self.replay_to = None if replay_to < 0 else replay_to
        self.unverified_mixer = self.unverified_kv = True

    def _check_attention(self, keys: mx.array) -> None:
        stored = self.kv.state[0] if self.kv.keys is not None else None
        if stored is not None and not isinstance(stored, mx.array):
            stored = stored[0]  # quantized: (packed, scales, biases)
        if stored is not None and stored.shape[1] != keys.shape[1]:
            raise PromptCacheError(
                f"prompt cache does not fit this model: its attention K/V has {stored.shape[1]} "
                f"KV heads, this model's layer {keys.shape[1]}; the file was made for another "
                "model or configuration")
        if isinstance(stored, mx.array) and stored.shape[3] != keys.shape[3]:
            raise PromptCacheError(
                f"prompt cache does not fit this model: its attention keys have head_dim "
                f"{stored.shape[3]}, this model's layer {keys.shape[3]}; the file was made for "
                "another model or configuration")
        self.unverified_kv = False

    # --- batching (mlx-lm's BatchGenerator and server) --------------------------

    @classmethod
    def merge(cls, caches: List["FalconH1Cache"]) -> "FalconH1Cache":
        merged = cls(caches[0].max_rollback)
        windows = {c.max_kv_size for c in caches}
        if len(windows) > 1:
            raise ValueError(f"cannot batch Falcon-H1 caches with different --max-kv-size: {windows}")
        batch_kv = BatchKVCache if windows == {None} else BatchRotatingKVCache
        merged.kv = batch_kv.merge([c.kv for c in caches])
        for c in caches:
            if c.replay_to is not None:
                raise ValueError("merge a trimmed Falcon-H1 cache after a forward call")
        merged.conv_state = _stack([c.conv_state for c in caches])
        merged.ssm_state = _stack([c.ssm_state for c in caches])
        merged._reset_window()
        return merged

    def prepare(self, *, lengths=None, right_padding=None, left_padding=None):
        if isinstance(self.kv, (BatchKVCache, BatchRotatingKVCache)):
            self.kv.prepare(lengths=lengths, right_padding=right_padding, left_padding=left_padding)
        if lengths is not None:
            self.lengths = mx.array(lengths)

    def finalize(self):
        if isinstance(self.kv, (BatchKVCache, BatchRotatingKVCache)):
            self.kv.finalize()
        self.lengths = None

    def filter(self, batch_indices):
        self.kv.filter(batch_indices)
        idx = mx.array(batch_indices)
        for name in ("conv_state", "ssm_state", "window_state", "history", "lengths"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[idx])

    def extend(self, other: "FalconH1Cache"):
        a, b = self.kv.offset.shape[0], other.kv.offset.shape[0]
        self.kv.extend(other.kv)
        self.conv_state = _concat(self.conv_state, other.conv_state, a, b)
        self.ssm_state = _concat(self.ssm_state, other.ssm_state, a, b)
        self.lengths = None
        self._reset_window()

    def extract(self, idx: int) -> "FalconH1Cache":
        single = FalconH1Cache(self.max_rollback)
        single.kv = self.kv.extract(idx)  # a KVCache, or a RotatingKVCache
        if self.replay_to is not None:
            raise ValueError("extract from a trimmed Falcon-H1 cache after a forward call")
        for name in ("conv_state", "ssm_state", "window_state", "history"):
            value = getattr(self, name)
            setattr(single, name, None if value is None else value[idx : idx + 1])
        # The window only holds tokens decoded since the merge, real for every row.
        single.window = self.window
        return single


def _make_room_in_window(kv: RotatingKVCache):
    """What RotatingKVCache does before writing one token in place (grow the buffer
    up to max_size, cut a prompt's longer buffer down to it, wrap around past the
    kept first tokens), for a compiled step that then writes the token itself.
    Returns (write position, valid positions)."""
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
    # Until the window first fills, positions are in order and those past this
    # token's are empty; once full, every position holds a kept key.
    return kv._idx, min(prev + 1, kv.keys.shape[2])


def _stack(states: List[Optional[mx.array]]) -> Optional[mx.array]:
    """One batch from per-sequence states; an empty cache's state is zeros."""
    like = next((s for s in states if s is not None), None)
    if like is None:
        return None
    return mx.concatenate([mx.zeros_like(like) if s is None else s for s in states])


def _concat(a: Optional[mx.array], b: Optional[mx.array], rows_a: int, rows_b: int):
    if a is None and b is None:
        return None
    like = a if a is not None else b
    if a is None:
        a = mx.zeros((rows_a,) + like.shape[1:], like.dtype)
    if b is None:
        b = mx.zeros((rows_b,) + like.shape[1:], like.dtype)
    return mx.concatenate([a, b])


def mixer_sizes(mixer) -> dict:
    """What a Falcon-H1 cache's arrays must match: H, P, N, G, K, conv channels."""
    return dict(heads=mixer.n_heads, head_dim=mixer.head_dim, n=mixer.d_state,
                groups=mixer.n_groups, width=mixer.conv_width,
                channels=mixer.n_heads * mixer.head_dim + 2 * mixer.n_groups * mixer.d_state)


def _check_fits(cache: "FalconH1Cache", want: dict, where: str, layer: Optional[int] = None) -> None:
    """Raise PromptCacheError naming the first of the cache's arrays whose sizes differ
    from the layer's (want: mixer_sizes, plus kv_heads and kv_head_dim if known)."""
    at = "" if layer is None else f"layer {layer}: "
    hpn = (want["heads"], want["head_dim"], want["n"])
    checks = [
        ("SSM state (H heads, P head dim, N state size)", cache.ssm_state, lambda s: s[1:], hpn),
        ("rollback-window SSM state (H, P, N)", cache.window_state, lambda s: s[1:], hpn),
        ("conv state (K-1 inputs, conv channels)", cache.conv_state, lambda s: s[1:],
         (want["width"] - 1, want["channels"])),
        ("rollback history (conv channels + H)", cache.history, lambda s: s[2:],
         (want["channels"] + want["heads"],)),
    ]
    if "kv_heads" in want and cache.kv.keys is not None:
        keys = cache.kv.state[0]
        if isinstance(keys, mx.array):
            checks.append(("attention keys (KV heads, _, head_dim)", keys, lambda s: (s[1], s[3]),
                           (want["kv_heads"], want["kv_head_dim"])))
        else:  # quantized K/V: the packed head_dim depends on the bits
            checks.append(("attention K/V (KV heads)", keys[0], lambda s: s[1:2],
                           (want["kv_heads"],)))
    batch = None
    for name, array, pick, expected in checks:
        if array is None:
            continue
        got = tuple(pick(array.shape))
        if got != tuple(expected):
            raise PromptCacheError(
                f"prompt cache does not fit {where}: {at}its {name} is {got}, the model's is "
                f"{tuple(expected)}; the file was made for another model or configuration")
        if batch is not None and array.shape[0] != batch:
            raise PromptCacheError(f"prompt cache is inconsistent: {at}its {name} has batch "
                                   f"{array.shape[0]}, other arrays {batch} (a damaged file?)")
        batch = array.shape[0]
    cache.unverified_mixer = False
    if "kv_heads" in want:
        cache.unverified_kv = False


def validate_prompt_cache(model, cache, source: str = "prompt cache") -> None:
    """Raise PromptCacheError unless `cache` (a list, one per layer) fits `model`:
    the number of layers, each layer's cache class, SSM, conv and K/V sizes."""
    layers = getattr(model, "layers", None)
    if layers is None:
        return
    if len(cache) != len(layers):
        raise PromptCacheError(
            f"{source}: {len(cache)} layer caches, but the model has {len(layers)} layers; the "
            "file was made for another model")
    for i, (layer, c) in enumerate(zip(layers, cache)):
        if not isinstance(c, FalconH1Cache):
            raise PromptCacheError(
                f"{source}: layer {i} holds a {type(c).__name__}, not a Falcon-H1 cache; the file "
                "was made for another architecture")
        want = mixer_sizes(layer.mamba)
        want.update(kv_heads=layer.self_attn.n_kv_heads, kv_head_dim=layer.self_attn.head_dim)
        _check_fits(c, want, f"{source} for this model", layer=i)


def load_prompt_cache(path, model=None, return_metadata: bool = False):
    """mlx-lm's load_prompt_cache with clear errors: a file that cannot be read
    (missing, truncated, not a prompt cache) and, given `model`, a cache that does
    not fit it raise PromptCacheError naming the file and the mismatch."""
    import os

    if not os.path.isfile(path):
        raise PromptCacheError(f"{path}: no such prompt-cache file")
    try:
        cache, metadata = mlx_lm_cache.load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PromptCacheError(
            f"{path}: cannot read this prompt-cache file ({first}); it is truncated, damaged "
            "or not a prompt cache saved by mlx_lm.save_prompt_cache") from e
    if model is not None:
        validate_prompt_cache(model, cache, source=str(path))
    return (cache, metadata) if return_metadata else cache


# mlx-lm's load_prompt_cache rebuilds caches by class name from its own module.
mlx_lm_cache.FalconH1Cache = FalconH1Cache


# --max-kv-size. mlx-lm's make_prompt_cache hands the cache to model.make_cache()
# whenever a model has one, dropping max_kv_size: the flag would be silently
# ignored (it is, for mlx-lm's own falcon_h1). Ours passes it on to a make_cache
# that takes it and leaves every other model to mlx-lm's.
_mlx_lm_make_prompt_cache = mlx_lm_cache.make_prompt_cache


def make_prompt_cache(model, max_kv_size: Optional[int] = None) -> list:
    """mlx-lm's make_prompt_cache, honouring max_kv_size for Falcon-H1 (see above)."""
    if max_kv_size is not None and _takes_max_kv_size(getattr(model, "make_cache", None)):
        return model.make_cache(max_kv_size=max_kv_size)
    return _mlx_lm_make_prompt_cache(model, max_kv_size)


def _takes_max_kv_size(make_cache) -> bool:
    import inspect

    try:
        return "max_kv_size" in inspect.signature(make_cache).parameters
    except (TypeError, ValueError):  # None, or not introspectable
        return False


def _install_make_prompt_cache() -> None:
    """Replace mlx-lm's make_prompt_cache in its cache module (where modules imported
    later take it from) and in every mlx_lm module that imported it already."""
    import sys

    for name, module in list(sys.modules.items()):
        if (name == "mlx_lm" or name.startswith("mlx_lm.")) and getattr(
            module, "make_prompt_cache", None
        ) is _mlx_lm_make_prompt_cache:
            module.make_prompt_cache = make_prompt_cache


_install_make_prompt_cache()
