"""Decode as one compiled step: the whole model's one-token forward under mx.compile.

A decode step of Falcon-H1 is a few hundred small MLX ops per layer: the muP
scalings, residual adds, gates, SiLU, dt softplus and clip, the parts of the
norms and RoPE that are not one `mx.fast` call. On a Metal GPU each is at least
one kernel launch; on the CPU each costs a few microseconds of dispatch, more
than its arithmetic. `mx.compile` traces the step once and replays it, fusing
the elementwise chains into single kernels and skipping the graph building.
It serves single sequences (mlx-lm's KVCache, or RotatingKVCache under
--max-kv-size) and batch generation (BatchKVCache, which the server uses) alike.

One source of truth: the compiled function runs the model's own layers, with
each layer's cache replaced by a `StepCache` that holds the same state as
plain arrays (the K/V buffers, or with --kv-bits the quantized bulk and the
float tail (quantized_kv.py), the write position and RoPE offsets, which
positions hold keys, the conv and SSM states) and
implements the same protocol as FalconH1Cache (cache.LayerCache), so the math
is the layer code's, only traced once.

Not retraced at every token: the K/V buffers have a fixed capacity, a multiple
of 256 tokens, and the position is an input array. A step retraces when the
capacity grows, or the batch size or a dtype changes; at most MAX_TRACES are
kept. What the step does not cover runs outside it, eagerly: a rollback's
replay (Model.__call__ has the mixers run it first), the rollback inputs'
bookkeeping and growing the K/V buffers (cache.py, mlx_lm_private.py), and every
cache the step cannot express (another cache class, a batch still taking
right-padded prompts, a cache loaded from a file and not yet checked); those
calls take the uncompiled path, which computes the same thing. A copied or
pickled model does not take the step along; it makes its own.

MLX_FALCON_H1_COMPILE=0 turns it off.
"""

import os
from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import BatchKVCache

from .cache import FalconH1Cache
from .quantized_kv import QuantizedKVWithTail


# Traces kept at once (one per batch size and K/V capacity met): enough for a
# long generation (a capacity step is 256 tokens) or a server's few batch sizes
# at a few capacities, small enough to bound the memory they hold.
MAX_TRACES = 16


def enabled() -> bool:
    """False when MLX_FALCON_H1_COMPILE=0 (read at each call)."""
    return os.environ.get("MLX_FALCON_H1_COMPILE", "1").strip() != "0"


class StepCache:
    """One layer's cache as the compiled step sees it: arrays in, arrays out
    (cache.LayerCache, as FalconH1Cache implements it for one unpadded token)."""

    bits = group_size = None  # float K/V
    lengths = None  # no padded prompts in a step

    def __init__(self, keys, values, position, offset, key_mask, conv_state, ssm_state):
        self.keys, self.values = keys, values  # (B, Hkv, capacity, D)
        self.position = position  # (), int32: where this token's key goes (a bounded K/V wraps)
        self.offset = offset  # RoPE's position: () or, for a batch, (B,) int32
        self.key_mask = key_mask  # (B, 1, 1, capacity) bool: the buffer positions holding keys
        self.conv_state, self.ssm_state = conv_state, ssm_state
        self.rows = None  # this token's rollback inputs, kept by the cache after the step

    def update_and_fetch(self, keys, values):
        # keys, values: (B, Hkv, 1, D), written at `position`.
        self.keys = mx.slice_update(self.keys, keys, self.position[None], axes=(2,))
        self.values = mx.slice_update(self.values, values, self.position[None], axes=(2,))
        return self.keys, self.values

    def whole_buffers(self):
        return self.keys, self.values, self.key_mask

    def rollback_split(self, length):
        return 0  # one token

    def scan_cuts(self, length):
        return [length]  # a step keeps no checkpoints

    def keep_checkpoint(self, cut):
        pass

    def keep_rollback_inputs(self, rows):
        self.rows = rows


class QuantizedStepCache(StepCache):
    """--kv-bits (quantized_kv.py): keys and values are (bulk, tail) pairs, the bulk
    mlx-lm's QuantizedKVCache triples (packed, scales, biases), read only, the tail
    the newest tokens' float K/V (B, Hkv, Ct, D), where this token is written at
    `position` as the float step writes it; `key_mask` is (bulk_len, tail_len), how
    many leading positions of each hold keys, this token's included."""

    def __init__(self, bits, group_size, *args):
        super().__init__(*args)
        self.bits, self.group_size = bits, group_size

    def update_and_fetch(self, keys, values):
        (bulk_keys, tail_keys), (bulk_values, tail_values) = self.keys, self.values
        at = self.position[None]
        self.keys = bulk_keys, mx.slice_update(tail_keys, keys, at, axes=(2,))
        self.values = bulk_values, mx.slice_update(tail_values, values, at, axes=(2,))
        return self.keys, self.values


def _step(model, quantized, tokens, position, filled, offset, left_padding, states):
    if quantized:  # (bits, group_size): constants of the trace, as shapes tell them apart
        # The tail holds the tokens after the bulk's: this one goes at `position`.
        real = (offset - position, filled)  # (bulk_len, tail_len), one for every layer
        caches = [QuantizedStepCache(*quantized, k, v, position, offset, real, c, s)
                  for k, v, c, s in states]  # fmt: skip
    else:
        # One mask for every layer (the buffers share their capacity): keys from the
        # row's left padding (batch generation's) to the last written position.
        keys = mx.arange(states[0][0].shape[2])
        key_mask = ((keys >= left_padding[:, None]) & (keys < filled))[:, None, None, :]
        caches = [StepCache(k, v, position, offset, key_mask, c, s) for k, v, c, s in states]
    logits = model.forward(tokens, caches)
    # The step's new K/V buffers: with --kv-bits the tails (the bulk is only read).
    written = [(c.keys[1], c.values[1]) if quantized else (c.keys, c.values) for c in caches]
    return logits, [(*kv, c.conv_state, c.ssm_state, c.rows) for kv, c in zip(written, caches)]


class CompiledDecode:
    """The compiled one-token step of one model; `traces` counts its (re)traces."""

    def __init__(self, model):
        self.traces = 0
        self.warm = False

        def traced(tokens, position, filled, offset, left_padding, states):
            self.traces += 1  # runs only while MLX traces
            return _step(model, self._quantized, tokens, position, filled, offset, left_padding, states)

        self._traced, self._quantized, self._shapes = traced, None, set()

        # inputs=model: the parameters are read at each call, not frozen at the
        # first trace (weights may be replaced, e.g. by adapters).
        self._fn = mx.compile(traced, inputs=model, outputs=None)

    def __reduce__(self):
        # copy.deepcopy and pickle reach the step through the model's __dict__.
        # A copy gets none and makes its own at its first decode (compiled_decode):
        # this one's trace reads this model's weights, and MLX's compiled function
        # cannot be copied or pickled anyway (mlx-lm's model tests deep-copy models).
        return _no_step, ()

    @staticmethod
    def eligible(cache, layers: Optional[int] = None) -> bool:
        """Whether every layer's cache is one the compiled step expresses, alike."""
        if not cache or (layers is not None and len(cache) != layers):
            return False  # a wrong length: the uncompiled path says what is wrong
        first = cache[0].step_signature() if type(cache[0]) is FalconH1Cache else None
        return first is not None and all(
            type(c) is FalconH1Cache and c.step_signature() == first for c in cache
        )

    def __call__(self, model, tokens: mx.array, cache: List[FalconH1Cache]) -> mx.array:
        if not self.warm:
            # The first step runs eagerly: on a Mac the kernels check themselves
            # against their references at first use (kernels/runtime_check.py), which
            # needs evaluation, impossible while MLX traces; the verdicts it leaves
            # are what the traced step then follows.
            self.warm = True
            return model.forward(tokens, cache)
        # Eager: room for the token (the same in every layer).
        position, filled = [c.make_room() for c in cache][0]
        kv = cache[0].kv
        if type(kv) is BatchKVCache:
            offset, left_padding = kv.offset.astype(mx.int32), kv.left_padding.astype(mx.int32)
        else:
            offset, left_padding = mx.array(kv.offset, mx.int32), mx.zeros((1,), mx.int32)
        position, filled = mx.array(position, mx.int32), mx.array(filled, mx.int32)
        # Sampled tokens come as uint32, prompt tokens as int32: one dtype, one trace.
        tokens = tokens.astype(mx.int32)
        quantized = (kv.bits, kv.group_size) if type(kv) is QuantizedKVWithTail else None
        states = [c.step_state() for c in cache]
        buffers = tuple(a.shape for _, a in tree_flatten(states[0][:2]))  # their capacities
        shape = (tokens.shape, offset.shape, buffers)
        if quantized != self._quantized or (
            shape not in self._shapes and len(self._shapes) >= MAX_TRACES
        ):
            # Start afresh, freeing every trace: MLX keeps one per input shape for
            # as long as the compiled function lives, and a server meets many
            # (batch size x K/V capacity). The quantization is not visible to
            # the trace's key at all.
            self._quantized, self._shapes = quantized, set()
            self._fn = mx.compile(self._traced, inputs=model, outputs=None)
        self._shapes.add(shape)
        logits, new = self._fn(tokens, position, filled, offset, left_padding, states)
        # Rebinding the buffers leaves the step's graph the only reference to the
        # old ones, so MLX updates them in place when it evaluates the step.
        for c, arrays in zip(cache, new):
            c.take_step_state(*arrays)
        return logits


def _no_step() -> None:
    return None  # what a copied CompiledDecode becomes (CompiledDecode.__reduce__)


def compiled_decode(model) -> Optional[CompiledDecode]:
    """The model's compiled step, made at first use; None when switched off (by the
    environment, or for a model split over processes: parallel.py)."""
    if not enabled() or not getattr(model, "compile_decode", True):
        return None
    step = model.__dict__.get("_compiled_decode")
    if step is None:
        step = CompiledDecode(model)
        object.__setattr__(model, "_compiled_decode", step)  # not a parameter
    return step


def decode_step(model, inputs: mx.array, cache) -> Optional[CompiledDecode]:
    """The compiled step to run this call with (one token over caches it expresses),
    or None for the uncompiled forward. Model.__call__ asks this at every call."""
    if inputs.shape[1] != 1:
        return None
    step = compiled_decode(model)
    return step if step is not None and step.eligible(cache, len(model.layers)) else None
