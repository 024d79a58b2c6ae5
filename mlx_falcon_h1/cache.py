"""The per-layer cache of a Falcon-H1 layer: attention K/V, conv state, SSM state.

Every Falcon-H1 layer runs attention and a Mamba2 mixer side by side, so one
cache object holds both kinds of memory and implements mlx-lm's cache protocol
for both: to mlx-lm's attention helpers it is a KV cache (`update_and_fetch`,
`offset`, `make_mask`); batch generation merges, filters, extends and extracts
it; prompt-cache files save and load it (prompt_cache_files.py checks them); and
it can be trimmed, which an SSM cache cannot do by itself. It is data and
bookkeeping: the layer (model.py) computes every state it holds.

Trimming. The SSM state at an earlier position cannot be recovered from the
current one. So the cache keeps a rollback window: the SSM state at the window's
start and the rollback inputs, the raw mixer inputs ([xBC | dt] rows) of the
window's tokens (plus the K-1 rows before it, the conv's left context).
Trimming n <= `trimmable` tokens cuts the window and leaves a replay of the kept
inputs from the window's start state to the next forward call, where the mixer
runs it. The window holds between `max_rollback` and 2 * `max_rollback` tokens
once that many have been seen; it costs (conv_dim + H) values per token and one
SSM state per layer, about 1/60 of the rollback a stored state per token would
cost. Decoding adds one row per token: the rows are kept as a list of parts and
joined when read or every ROLLBACK_JOIN_PARTS parts, since joining them at each
token is one more kernel launch per layer per token on a Mac (a decode step is
bound by launches there).

Bounded attention (--max-kv-size N, the attention window). The attention K/V is
then mlx-lm's RotatingKVCache(max_size=N, keep=4), as mlx-lm gives every model
without a cache of its own: the first 4 tokens and the latest ones are kept, the
oldest others overwritten. Only attention forgets: the conv and SSM state still
carry the whole context, as mlx-swift-lm's Falcon-H1 does. It is an
approximation of the model (attention no longer sees every token). Once the
attention window is full the K/V cannot be trimmed (its oldest keys are gone)
and --kv-bits is refused (mlx-lm cannot quantize a rotating cache).

Checkpoints (prompt_cache.py). Further back than the window, an SSM state can
only be read again. So while a prompt is read the cache can keep the conv and
SSM state at planned positions (every `checkpoint_interval` tokens, and at
`checkpoint_positions`): the mixer splits its scan there (scan_cuts) and hands
the state over (keep_checkpoint). A checkpoint holds no K/V: cut back from
whatever entry holds the K/V of that prefix, it restores the cache at that
position (prompt_cache.py). Only single-sequence calls keep them (a padded
batch's rows are at different positions).

Legend: B batch, L tokens, C conv channels, H SSM heads, P head dim, N state
size, K conv width.
"""

from typing import Dict, FrozenSet, List, Optional, Protocol, Tuple, Union

import mlx.core as mx
import mlx_lm.models.cache as mlx_lm_cache
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (
    BatchKVCache,
    BatchRotatingKVCache,
    KVCache,
    RotatingKVCache,
)

from .mlx_lm_private import BaseCache, kv_signature, make_room, store_step
from .quantized_kv import QuantizedKVWithTail


class PromptCacheError(ValueError):
    """A prompt-cache file that cannot be read, or does not fit the model it is used with."""


# Speculative decoding trims at most --num-draft-tokens; chat templates that
# re-render a reply trim a few tokens. Larger windows cost memory (see above).
MAX_ROLLBACK_TOKENS = 32

# Rollback-input rows kept apart before they are joined into one array: one
# concatenate per layer every this many decoded tokens instead of every token.
# Each part is a view of its step's in_proj output, which it keeps alive until
# the join: a few kB per token per layer.
ROLLBACK_JOIN_PARTS = 32

# --max-kv-size keeps the first tokens too, as mlx-lm's make_prompt_cache does:
# attention sinks, which models lean on (the BOS token takes much attention).
KEEP_TOKENS = 4


class LayerCache(Protocol):
    """What one layer's call (model.py's Attention and Mixer) reads and writes in its cache.

    Two classes implement it: FalconH1Cache for every call, and decode.StepCache,
    one layer's cache inside the compiled one-token step. The last three members
    are reached only when `lengths` is set or `rollback_split` is not 0, which
    the compiled step never meets (one token, no padded prompts); StepCache lacks
    them. Before a call, Model.__call__ has the mixer bring a FalconH1Cache up to
    date (Mixer.prepare: a rollback's replay), so neither has work pending.
    """

    # Attention: mlx-lm's KV-cache protocol, plus the whole buffers.
    offset: Union[int, mx.array]  # tokens before this call: its RoPE position (per row: (B,))
    bits: Optional[int]  # --kv-bits: the quantized K/V's bits and group size; None: float K/V
    group_size: Optional[int]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple: ...

    def whole_buffers(self) -> Optional[Tuple]:
        """(keys, values, real) after update_and_fetch, `real` saying which buffer
        positions hold keys (a count of the first ones, or a (B, 1, 1, capacity)
        mask); None to read update_and_fetch's keys instead."""

    # Mixer: its state, and the rollback inputs.
    conv_state: Optional[mx.array]  # (B, K-1, C) the last raw conv inputs
    ssm_state: Optional[mx.array]  # (B, H, P, N) float32
    lengths: Optional[mx.array]  # (B,) right-padded batch prompts: real tokens still to come

    def rollback_split(self, length: int) -> int:
        """Where a call of `length` tokens is split so that the rollback window's
        start state comes out of the scan (0: not split)."""

    def scan_cuts(self, length: int) -> List[int]:
        """Where the call's scan ends its pieces, ascending, the last `length`: the
        rollback window's start and the planned checkpoints inside the call."""

    def keep_checkpoint(self, cut: int) -> None:
        """The state now is the state after the call's first `cut` tokens."""

    def keep_rollback_inputs(self, rows: mx.array) -> None:
        """This call's raw [xBC | dt] rows (B, L, C + H), before its scan."""

    # FalconH1Cache only (see above).
    def restart_rollback_window(self) -> None: ...

    def end_padded_call(self, length: int) -> None: ...

    def with_state(self, y: mx.array) -> mx.array: ...


class FalconH1Cache(BaseCache):
    # Checkpoints: where to keep (conv_state, ssm_state) while reading (set on a
    # cache by prompt_cache.py), and, per instance, `checkpoints`: what was kept,
    # by position (tokens read). call_start: the position the current call starts
    # at (begin_call; None: it keeps none); checkpoint_cuts: the current call's
    # cuts whose state is kept, with their positions (scan_cuts).
    checkpoint_interval: Optional[int] = None
    checkpoint_positions: FrozenSet[int] = frozenset()
    call_start: Optional[int] = None
    checkpoint_cuts: Dict[int, int] = {}

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
        self.rollback_window = 0  # tokens in the rollback window
        self.rollback_start_state: Optional[mx.array] = None  # SSM state at the window start
        # (B, K-1 + window, C + H) raw [xBC | dt], in parts along the tokens (rollback_inputs)
        self._rollback_parts: List[mx.array] = []
        self.replay_to: Optional[int] = None  # after a trim: the window tokens to replay the state to
        # Loaded from a file (from_state): its sizes are checked against the layer
        # at the first call, so that a cache made for another model or
        # configuration fails with the mismatch named, not deep in a matmul.
        self.unverified_mixer = self.unverified_kv = False
        self.checkpoints: Dict[int, Tuple[mx.array, mx.array]] = {}

    # --- attention side: mlx-lm's KV caches do the work -------------------------

    @property
    def offset(self):
        return self.kv.offset

    def update_and_fetch(self, keys, values):
        if self.unverified_kv:
            self._check_attention(keys)
        return self.kv.update_and_fetch(keys, values)

    def whole_buffers(self):
        """(keys, values, real): the K/V buffers after update_and_fetch, of which the
        first `real` positions hold keys (--kv-bits: the bulk's and the tail's,
        quantized_kv.py); None for other K/V caches than those two. One-token
        attention reads these: a view of their first keys would be copied by
        every matmul that reads it."""
        if type(self.kv) is QuantizedKVWithTail:
            return self.kv.whole_buffers()
        if type(self.kv) is not KVCache:
            return None
        return self.kv.keys, self.kv.values, self.kv.offset

    def make_mask(self, *args, **kwargs):
        return self.kv.make_mask(*args, **kwargs)

    @property
    def bits(self) -> Optional[int]:
        """The K/V's bits once quantized (--kv-bits), else None."""
        return self.kv.bits if isinstance(self.kv, QuantizedKVWithTail) else None

    @property
    def group_size(self) -> Optional[int]:
        return self.kv.group_size if isinstance(self.kv, QuantizedKVWithTail) else None

    @property
    def max_kv_size(self) -> Optional[int]:
        """The attention window (--max-kv-size), or None for the whole context."""
        return getattr(self.kv, "max_size", None)

    def to_quantized(self, group_size: int = 64, bits: int = 4) -> "FalconH1Cache":
        """--kv-bits: quantize the attention K/V, its newest tokens to come kept in float
        (quantized_kv.py); conv and SSM state stay as they are."""
        if self.max_kv_size is not None:
            raise ValueError(
                f"--kv-bits cannot be combined with --max-kv-size ({self.max_kv_size}): mlx-lm "
                "cannot quantize a bounded (rotating) K/V cache; use one or the other")
        if isinstance(self.kv, KVCache):
            self.kv = QuantizedKVWithTail.from_float(self.kv, group_size, bits)
        return self

    def size(self):
        return self.kv.size()

    def empty(self):
        return self.kv.empty() and self.ssm_state is None

    @property
    def nbytes(self):
        arrays = [self.conv_state, self.ssm_state, self.rollback_start_state, *self._rollback_parts]
        arrays += [a for state in self.checkpoints.values() for a in state]
        return self.kv.nbytes + sum(a.nbytes for a in arrays if a is not None)

    # --- mixer side: the layer's Mixer writes the states; this keeps the books ---

    def rollback_split(self, length: int) -> int:
        # A call longer than the window (a prompt) is split where the new window
        # starts; padded prompts keep no window.
        return max(0, length - self.max_rollback) if self.lengths is None else 0

    def begin_call(self) -> None:
        """Before a call (Mixer.prepare): note where it starts, for its checkpoints."""
        planned = self.checkpoint_interval or self.checkpoint_positions
        single = isinstance(self.kv.offset, int) and self.lengths is None
        self.call_start = self.kv.offset if planned and single else None

    def scan_cuts(self, length: int) -> List[int]:
        start, self.call_start = self.call_start, None
        planned = set()
        if start is not None:
            every = self.checkpoint_interval
            if every:
                planned.update(range(every - start % every, length + 1, every))
            planned.update(p - start for p in self.checkpoint_positions if start < p <= start + length)
        self.checkpoint_cuts = {cut: start + cut for cut in planned}
        return sorted(({self.rollback_split(length), length} | planned) - {0})

    def keep_checkpoint(self, cut: int) -> None:
        if cut in self.checkpoint_cuts:
            self.checkpoints[self.checkpoint_cuts[cut]] = (self.conv_state, self.ssm_state)

    def take_checkpoints(self) -> Dict[int, Tuple[mx.array, mx.array]]:
        """The checkpoints kept so far, handed over (the cache keeps none after)."""
        kept, self.checkpoints = self.checkpoints, {}
        return kept

    @property
    def rollback_inputs(self) -> Optional[mx.array]:
        """(B, K-1 + window, C + H): the rollback window's raw [xBC | dt] rows after
        its K-1 rows of conv context; None before the window has any."""
        self._join_rollback_parts()
        return self._rollback_parts[0] if self._rollback_parts else None

    def _join_rollback_parts(self) -> None:
        if len(self._rollback_parts) > 1:
            self._rollback_parts = [mx.concatenate(self._rollback_parts, axis=1)]

    @rollback_inputs.setter
    def rollback_inputs(self, value: Optional[mx.array]) -> None:
        self._rollback_parts = [] if value is None else [value]

    def keep_rollback_inputs(self, rows: mx.array) -> None:
        if not self._rollback_parts:
            # The K-1 conv-context rows before the window; their dt columns are unused.
            heads = rows.shape[-1] - self.conv_state.shape[-1]
            pad = mx.zeros(self.conv_state.shape[:2] + (heads,), dtype=self.conv_state.dtype)
            self._rollback_parts = [mx.concatenate([self.conv_state, pad], axis=-1)]
        self._rollback_parts.append(rows)
        if len(self._rollback_parts) > ROLLBACK_JOIN_PARTS:
            self._join_rollback_parts()  # bounds what the parts keep alive
        self.rollback_window += rows.shape[1]

    def restart_rollback_window(self) -> None:
        """The window starts afresh at the current state (after a long call's first
        part, or where rows of a batch end at different places)."""
        self.rollback_window, self.rollback_start_state, self.rollback_inputs = 0, self.ssm_state, None

    def end_padded_call(self, length: int) -> None:
        self.lengths = self.lengths - length
        self.restart_rollback_window()  # rows end at different places: no common window

    def with_state(self, y: mx.array) -> mx.array:
        """y, made to depend on the new cache arrays, so that evaluating the layer's
        output computes them too. Otherwise they wait for the end of the step
        (mlx-lm evaluates the cache after the logits), and each holds this
        layer's whole mixer input (in_proj's output, the padded conv input) of
        the step alive until then: every layer's at once."""
        state = [a for a in (self.conv_state, self.ssm_state, self.rollback_inputs) if a is not None]
        return mx.depends([y], state)[0]

    # What Mixer.prepare replays before a call: data only, the mixer computes.

    def rollback_overflow(self, length: int) -> int:
        """Oldest window tokens to drop before a call of `length` tokens, so the window
        stays within 2 * max_rollback (once per max_rollback tokens of decoding)."""
        if self.lengths is not None or self.rollback_split(length):
            return 0  # this call restarts the window anyway
        grown = self.rollback_window + length
        return grown - self.max_rollback if grown > 2 * self.max_rollback else 0

    def replay_inputs(self, tokens: int) -> Tuple[mx.array, mx.array, mx.array]:
        """(xBC, dt, conv context) of the window's first `tokens` tokens, to replay
        from `rollback_start_state`."""
        k = self.conv_state.shape[1]
        channels = self.conv_state.shape[-1]
        rows = self.rollback_inputs[:, k : k + tokens]
        return rows[..., :channels], rows[..., channels:], self.rollback_inputs[:, :k, :channels]

    def drop_rollback_inputs(self, tokens: int, start_state: mx.array) -> None:
        """Move the window start `tokens` forward, to where the SSM state is `start_state`."""
        self.rollback_start_state = start_state
        self.rollback_inputs = self.rollback_inputs[:, tokens:]
        self.rollback_window -= tokens

    # --- the compiled decode step (decode.py) ----------------------------------

    def step_signature(self) -> Optional[tuple]:
        """What every layer's cache must share for one compiled decode step, or None
        when the step cannot take this one: nothing cached yet, a batch still taking
        padded prompts, a cache loaded from a file and not yet checked, or a K/V
        cache the step does not express (mlx_lm_private.kv_signature)."""
        if (
            self.kv.keys is None
            or self.lengths is not None
            or self.conv_state is None
            or self.ssm_state is None
            or not self._rollback_parts
            or self.unverified_mixer
            or self.unverified_kv
        ):
            return None
        if type(self.kv) is QuantizedKVWithTail:
            return self.kv.step_signature()
        return kv_signature(self.kv)

    def make_room(self) -> Tuple[int, int]:
        """Before a compiled step, eagerly: room in the K/V buffers for one more token.
        Returns (where this token's K/V goes, how many buffer positions then hold keys;
        --kv-bits: tail positions)."""
        if type(self.kv) is QuantizedKVWithTail:
            return self.kv.make_room()
        return make_room(self.kv)

    def step_state(self):
        if type(self.kv) is QuantizedKVWithTail:  # (bulk triple, tail) pairs
            return (*self.kv.step_state(), self.conv_state, self.ssm_state)
        return self.kv.keys, self.kv.values, self.conv_state, self.ssm_state

    def take_step_state(self, keys, values, conv_state, ssm_state, rows) -> None:
        """After a compiled step: its new buffers (--kv-bits: tails) and states, one
        more token."""
        if type(self.kv) is QuantizedKVWithTail:
            self.kv.take_step(keys, values)
        else:
            store_step(self.kv, keys, values)
        self.conv_state, self.ssm_state = conv_state, ssm_state
        self.keep_rollback_inputs(rows)

    # --- trimming (speculative decoding, prompt-cache prefix reuse) -------------

    def is_trimmable(self):
        return True  # within `trimmable` tokens (see trim)

    @property
    def trimmable(self) -> int:
        """How many tokens `trim` can take back now."""
        if self.lengths is not None or not self.kv.is_trimmable():
            return 0  # a bounded K/V that has overwritten keys cannot go back
        return min(self.rollback_window, self.kv.size())

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
        # States of tokens taken back (rejected draft tokens) are no checkpoints.
        self.checkpoints = {p: s for p, s in self.checkpoints.items() if p <= self.kv.offset}
        self.rollback_window -= n
        k = self.conv_state.shape[1]
        channels = self.conv_state.shape[-1]
        self.rollback_inputs = self.rollback_inputs[:, : k + self.rollback_window]
        self.conv_state = self.rollback_inputs[:, self.rollback_window :, :channels]
        self.replay_to = self.rollback_window
        return n

    # --- prompt-cache files -----------------------------------------------------

    def arrays(self) -> List[mx.array]:
        """Every array the cache holds, the rollback rows as their parts: what a
        decode step leaves behind, without the join that reading `state` does
        (launch_count counts a step's launches from these)."""
        if type(self.kv) is QuantizedKVWithTail:
            kv = self.kv.arrays()  # its state would quantize the tail into a copy
        else:
            kv = [a for _, a in tree_flatten(self.kv.state) if isinstance(a, mx.array)]
        mixer = [self.conv_state, self.ssm_state, self.rollback_start_state, self.lengths]
        return kv + [a for a in mixer if a is not None] + list(self._rollback_parts)

    @property
    def state(self):
        # Every array, so mlx-lm evaluates all of them after each step, plus what
        # rebuilds the object (load_prompt_cache calls from_state with this list).
        # --kv-bits: mlx-lm's QuantizedKVCache, the float tail quantized into a copy.
        kv = self.kv.mlx_lm() if type(self.kv) is QuantizedKVWithTail else self.kv
        return [
            type(kv).__name__,
            kv.state,
            self.conv_state,
            self.ssm_state,
            self.rollback_start_state,
            self.rollback_inputs,
            self.lengths,
            self.rollback_window,
            self.max_rollback,
            -1 if self.replay_to is None else self.replay_to,
        ]

    @state.setter
    def state(self, v):
        kv_class, kv_state, *arrays, self.rollback_window, self.max_rollback, replay_to = v
        self.kv = getattr(mlx_lm_cache, kv_class).from_state(kv_state)
        if kv_class == "QuantizedKVCache":  # decoding on, newest tokens go into a float tail
            self.kv = QuantizedKVWithTail(bulk=self.kv)
        self.conv_state, self.ssm_state, self.rollback_start_state, self.rollback_inputs, self.lengths = arrays
        self.replay_to = None if replay_to < 0 else replay_to
        self.unverified_mixer = self.unverified_kv = True
        self.checkpoints = {}

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
        sizes = {c.max_kv_size for c in caches}
        if len(sizes) > 1:
            raise ValueError(f"cannot batch Falcon-H1 caches with different --max-kv-size: {sizes}")
        batch_kv = BatchKVCache if sizes == {None} else BatchRotatingKVCache
        merged.kv = batch_kv.merge([c.kv for c in caches])
        for c in caches:
            if c.replay_to is not None:
                raise ValueError("merge a trimmed Falcon-H1 cache after a forward call")
        merged.conv_state = _stack([c.conv_state for c in caches])
        merged.ssm_state = _stack([c.ssm_state for c in caches])
        merged.restart_rollback_window()
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
        for name in ("conv_state", "ssm_state", "rollback_start_state", "rollback_inputs", "lengths"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[idx])

    def extend(self, other: "FalconH1Cache"):
        a, b = self.kv.offset.shape[0], other.kv.offset.shape[0]
        self.kv.extend(other.kv)
        self.conv_state = _concat(self.conv_state, other.conv_state, a, b)
        self.ssm_state = _concat(self.ssm_state, other.ssm_state, a, b)
        self.lengths = None
        self.restart_rollback_window()

    def extract(self, idx: int) -> "FalconH1Cache":
        single = FalconH1Cache(self.max_rollback)
        single.kv = self.kv.extract(idx)  # a KVCache, or a RotatingKVCache
        if self.replay_to is not None:
            raise ValueError("extract from a trimmed Falcon-H1 cache after a forward call")
        for name in ("conv_state", "ssm_state", "rollback_start_state", "rollback_inputs"):
            value = getattr(self, name)
            setattr(single, name, None if value is None else value[idx : idx + 1])
        # The window only holds tokens decoded since the merge, real for every row.
        single.rollback_window = self.rollback_window
        return single


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


def check_fits(cache: "FalconH1Cache", want: dict, where: str, layer: Optional[int] = None) -> None:
    """Raise PromptCacheError naming the first of the cache's arrays whose sizes differ
    from the layer's (want: mixer_sizes, plus kv_heads and kv_head_dim if known)."""
    at = "" if layer is None else f"layer {layer}: "
    hpn = (want["heads"], want["head_dim"], want["n"])
    checks = [
        ("SSM state (H heads, P head dim, N state size)", cache.ssm_state, lambda s: s[1:], hpn),
        ("rollback-window SSM state (H, P, N)", cache.rollback_start_state, lambda s: s[1:], hpn),
        ("conv state (K-1 inputs, conv channels)", cache.conv_state, lambda s: s[1:],
         (want["width"] - 1, want["channels"])),
        ("rollback inputs (conv channels + H)", cache.rollback_inputs, lambda s: s[2:],
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


def check_cache_length(cache, layers: int) -> None:
    if cache is not None and len(cache) != layers:  # zip would run the first layers only
        raise ValueError(
            f"a cache of {len(cache)} layers for a model of {layers}: "
            "it was made for another model (a prompt-cache file?)"
        )
