"""MLX's measured peak memory of a prefill, and the memory planner's estimate of it.

The planner's prefill constants (memory.py) were calibrated with this on the
project's CPU machine; tests/test_memory.py and examples/memory_planner_check.py
hold it to the measurement.
"""

from typing import Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from .memory import ModelSizes, plan
from .model import Model, ModelArgs
from .parameter_dtypes import castable


def measure_prefill_peak(args: ModelArgs, tokens: int, prefill_step: int,
                         dtype=mx.float32, batch: int = 1, kv_bits: Optional[int] = None,
                         kv_group_size: int = 64, seed: int = 0) -> dict:
    """Build a random model of `args`, prefill `tokens` tokens through our cache as
    mlx-lm's generate_step does (steps of `prefill_step`, mx.eval of the cache
    states after each, the last token's logits at the end), and return MLX's peak
    memory: the weights plus everything the prefill allocated."""
    mx.random.seed(seed)
    model = Model(args)
    if dtype != mx.float32:  # as our loader holds them: SSM parameters, conv, norms stay float32
        cast = [(n, p.astype(dtype)) for n, p in tree_flatten(model.parameters()) if castable(n)]
        model.update(tree_unflatten(cast))
    mx.eval(model.parameters())
    weights = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    prompt = mx.random.randint(0, args.vocab_size, (batch, tokens))
    mx.eval(prompt)
    cache = model.make_cache()
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    done = 0
    while tokens - done > 1:
        n = min(prefill_step, tokens - done - 1)
        model(prompt[:, done : done + n], cache=cache)
        if kv_bits is not None:  # mlx-lm's maybe_quantize_kv_cache, from the first token
            cache = [c.to_quantized(group_size=kv_group_size, bits=kv_bits) for c in cache]
        mx.eval([c.state for c in cache])
        done += n
        mx.clear_cache()
    logits = model(prompt[:, done:], cache=cache)[:, -1, :]
    mx.eval(logits, [c.state for c in cache])
    peak = mx.get_peak_memory() - before
    cache_bytes = sum(c.nbytes for c in cache)
    del model, cache, logits
    mx.clear_cache()
    return dict(tokens=tokens, prefill_step=prefill_step, batch=batch, kv_bits=kv_bits,
                weights=weights, cache=cache_bytes, peak_above_weights=peak, peak=weights + peak)


def check(args: ModelArgs, tokens: int, prefill_step: int, dtype=mx.float32, **options) -> dict:
    """measure_prefill_peak against plan() for the same model: both totals, the error."""
    measured = measure_prefill_peak(args, tokens, prefill_step, dtype=dtype, **options)
    sizes = ModelSizes("measured", args, measured["weights"], [], str(dtype), dtype.size)
    p = plan(sizes, tokens, batch=options.get("batch", 1), prefill_step=prefill_step,
             kv_bits=options.get("kv_bits"), kv_group_size=options.get("kv_group_size", 64),
             device="cpu")  # measured here, on MLX's CPU backend
    error = (p.total - measured["peak"]) / measured["peak"]
    return dict(measured, estimate=p.total, estimate_cache=p.cache,
                estimate_transient=p.prefill_transient, error=error)
