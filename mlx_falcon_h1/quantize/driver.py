"""The layer-by-layer driver every method shares: the model taken apart into its
embedding, decoder layers and head, each run over the calibration samples in
batches (evaluated batch by batch), and the inputs of a layer's linears captured.

Methods go one decoder layer at a time, so a big model is never held in float32
whole: a layer is cast to float32, calibrated on its inputs, and its outputs
(through the layer as quantized, or as float) are the next layer's inputs.
"""

from typing import Callable, Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .layers import module_at, quantizable, set_module, to_float32


def embed(model, tokens: mx.array) -> mx.array:
    """The first decoder layer's input (float32) for token ids (N, L)."""
    inner = model.model
    h = inner.embed_tokens(tokens).astype(mx.float32)
    return h if inner.embedding_multiplier == 1.0 else h * inner.embedding_multiplier


def head(model, h: mx.array) -> mx.array:
    """Logits from the last decoder layer's output."""
    h = model.model.final_layernorm(h)
    logits = model.model.embed_tokens.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)
    m = model.args.lm_head_multiplier
    return logits if m == 1.0 else logits * m


def run_batched(fn: Callable, x: mx.array, batch_size: int) -> mx.array:
    """fn over x (N, ...) in batches, evaluated batch by batch."""
    out = []
    for i in range(0, x.shape[0], batch_size):
        y = fn(x[i : i + batch_size])
        mx.eval(y)
        out.append(y)
    return mx.concatenate(out, axis=0)


def decoder(layer) -> Callable:
    """A decoder layer as a function of its input alone (causal, no cache), in float32."""
    return lambda x: layer(x, "causal" if x.shape[1] > 1 else None, None).astype(mx.float32)


def output_error(fn: Callable, x: mx.array, target: mx.array, batch_size: int) -> float:
    """Mean squared difference of fn(x) from target."""
    return ((run_batched(fn, x, batch_size) - target) ** 2).mean().item()


class _Capture(nn.Module):
    """Wraps a layer; calls `record(x)` with each input before running it."""

    def __init__(self, module, record):
        super().__init__()
        self.module = module
        self._record = record

    def __call__(self, x, *args, **kwargs):
        self._record(x)
        return self.module(x, *args, **kwargs)


def linears(layer: nn.Module, group_size: int) -> Dict[str, nn.Module]:
    """The quantizable Linear layers of a decoder layer, by path."""
    return {
        p: m
        for p, m in tree_flatten(layer.leaf_modules(), is_leaf=nn.Module.is_module)
        if isinstance(m, nn.Linear) and quantizable(m, group_size)
    }


def capture_inputs(layer, paths, x, batch_size, reduce) -> Dict[str, object]:
    """Run `layer` on x with each linear at `paths` wrapped; reduce(state, input)
    folds its inputs into one value per path (a Hessian, or the inputs themselves)."""
    state: Dict[str, object] = {p: None for p in paths}
    originals = {p: module_at(layer, p) for p in paths}

    def recorder(p):
        def record(inp):
            state[p] = reduce(state[p], inp.astype(mx.float32))

        return record

    for p, m in originals.items():
        set_module(layer, p, _Capture(m, recorder(p)))
    try:
        for i in range(0, x.shape[0], batch_size):
            decoder(layer)(x[i : i + batch_size])
            mx.eval([v for v in state.values() if v is not None])
    finally:
        for p, m in originals.items():
            set_module(layer, p, m)
    return state


def teacher_logits(model, tokens, settings, top_k: int = 8192):
    """The float model's logits on the calibration samples, one decoder layer at a
    time in float32 (so a big model never needs a float32 copy). For vocabularies
    over top_k, the top_k largest with their indices (mlx-lm's DWQ does the same)."""
    x = run_batched(lambda t: embed(model, t), tokens, settings.batch_size)
    for layer in model.layers:
        originals = to_float32(layer)
        x = run_batched(decoder(layer), x, settings.batch_size)
        layer.update(originals)
    head_modules = (model.model.final_layernorm, getattr(model, "lm_head", None), model.model.embed_tokens)
    head_params = [m for m in head_modules if m is not None]
    saved = [to_float32(m) for m in head_params]
    logits = run_batched(lambda v: head(model, v).astype(mx.float32), x, settings.batch_size)
    for m, p in zip(head_params, saved):
        m.update(p)
    if logits.shape[-1] <= top_k:
        return logits, None
    idx = mx.argpartition(logits, kth=-top_k, axis=-1)[..., -top_k:]
    return mx.take_along_axis(logits, idx, axis=-1), idx
