"""Launching primitives of one decode step, counted as MLX would run it on a Mac.

On a Metal GPU every MLX primitive in a step's graph is at least one kernel
dispatch, except views, which launch nothing. This machine has no Metal, so the
step's graph is built (never evaluated) the way it would be on a Mac: Metal
reported available, the GPU the default device, so every dispatcher takes the
path it takes there (plain MLX ops instead of the CPU's fused forms, custom
kernels where they fit). Each custom Metal kernel, and each op MLX builds as
one kernel on a GPU stream but as a chain of ops on the CPU's (the mx.fast
ops, an affine mx.dequantize), stands in as one node. The
graph is then read with `mx.export_to_dot` and its primitives counted.

Approximations, the same for every model counted: a reshape is counted as a
view (on Metal it copies when its input is not contiguous), and a compiled
(fused) node as one launch, as MLX's Metal backend runs it.

The same graph says what a step does to the weights. Its inputs are named
after the model's parameters (export_to_dot names an array by its identity),
so an AsType whose input is a parameter (or a view of all of it, as a Linear's
transposed weight) is a weight cast: a weight in one dtype meeting an
activation in a wider one (a bfloat16 matmul weight after a float32 norm
weight has made the residual stream float32) is copied into the wider dtype,
every step. Casts fused inside a compiled node launch nothing and write
nothing, and are not counted.
"""

import contextlib
import os
import re
import tempfile
from collections import Counter, defaultdict
from typing import Callable, Dict, List, NamedTuple, Optional

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from . import decode

# Primitives that launch nothing: views of their input's memory, and
# CustomTransforms (mx.custom_function's wrapper: its outputs share the buffers
# of the function's).
VIEWS = {
    "AsStrided", "Broadcast", "CustomTransforms", "Depends", "ExpandDims", "Reshape",
    "Slice", "Split", "Squeeze", "StopGradient", "Transpose", "Unflatten", "Flatten",
}  # fmt: skip


class _StandIns:
    """Custom kernels and mx.fast ops as they are on Metal: one launch each.

    Their outputs are views of an input, behind an mx.depends on every input: no
    launching node of their own in the graph (so compile cannot merge or fuse
    them), and a fusion barrier like the real kernel. The launches are counted
    here, as the calls happen while the step is built (or traced)."""

    def __init__(self):
        self.launches = 0
        self.inputs: List[List[mx.array]] = []  # per launch, the arrays it was handed

    def outputs(self, shapes_dtypes, inputs):
        self.launches += 1
        arrays = [a for a in inputs if isinstance(a, mx.array)]
        self.inputs.append(arrays)
        outs = []
        for shape, dtype in shapes_dtypes:
            source = next((a for a in arrays if a.dtype == dtype), None)
            # No input of that dtype to view (a kernel's float32 partial results): a
            # constant, no node (a kernel writes any dtype; a cast would count a launch).
            source = mx.array(0, dtype) if source is None else source.reshape(-1)[:1].reshape(())
            outs.append(mx.broadcast_to(source, tuple(shape)))
        return mx.depends(outs, arrays)


def _promoted(*arrays) -> mx.Dtype:
    return mx.result_type(*[a for a in arrays if a is not None])


def _stand_ins(counter: _StandIns):
    """A stand-in for each mx.fast op (one Metal kernel each; on this machine's CPU
    stream MLX would run them as a chain of plain ops) and for mx.fast.metal_kernel."""

    def kernel(inputs, output_shapes, output_dtypes, **_):
        return counter.outputs(list(zip(output_shapes, output_dtypes)), inputs)

    # The dtypes the real ops give: a norm's output is its input's promoted with its
    # weight's (a float32 norm weight makes a bfloat16 model's activations float32).
    def rms_norm(x, weight, eps, **_):
        return counter.outputs([(x.shape, _promoted(x, weight))], [x, weight])[0]

    def layer_norm(x, weight, bias, eps, **_):
        return counter.outputs([(x.shape, _promoted(x, weight, bias))], [x, weight, bias])[0]

    def rope(x, dims, *, traditional, base, scale, offset, freqs=None, **_):
        return counter.outputs([(x.shape, x.dtype)], [x, offset, freqs])[0]

    def sdpa(q, k, v, *, scale, mask=None, sinks=None, **_):
        return counter.outputs([(q.shape[:-1] + v.shape[-1:], q.dtype)], [q, k, v, mask, sinks])[0]

    fast = {"rms_norm": rms_norm, "layer_norm": layer_norm, "rope": rope,
            "scaled_dot_product_attention": sdpa}  # fmt: skip
    return kernel, fast


def _dequantize_stand_in(counter: _StandIns, dequantize):
    """mx.dequantize as on Metal: one kernel for the affine mode (MLX builds one
    fast::Quantize primitive on a GPU stream and a chain of shifts, masks and
    multiplies on the CPU's); a quantized embedding's lookup calls it every step."""

    def stand_in(w, scales, biases=None, group_size=64, bits=4, mode="affine", dtype=None, **kwargs):
        if mode != "affine" or kwargs:  # other modes: as MLX builds them here
            return dequantize(w, scales, biases, group_size, bits, mode, dtype=dtype, **kwargs)
        shape = tuple(w.shape[:-1]) + (w.shape[-1] * 32 // bits,)
        return counter.outputs([(shape, dtype or scales.dtype)], [w, scales, biases])[0]

    return stand_in


@contextlib.contextmanager
def as_on_a_mac():
    """Dispatchers see Metal and a GPU default device; custom kernels and mx.fast
    ops are stand-ins that count their launches (yields the counter)."""
    import mlx_lm.models.ssm as mlx_lm_ssm

    from .kernels import (conv1d, gated_norm, mixer_step, quantized_attention, residual_norm, rope,
                          ssd_scan, ssm_step)

    counter = _StandIns()
    kernel, fast = _stand_ins(counter)
    ours = (ssm_step, conv1d, ssd_scan, mixer_step, gated_norm, rope, residual_norm, quantized_attention)
    # Every kernel a module builds (_KERNEL, and a second pass's _KERNEL_COMBINE ...).
    kernels = [(mlx_lm_ssm, "_ssm_kernel")] + [(m, name) for m in ours for name in vars(m)
                                               if name.startswith("_KERNEL")]
    patches = [(m, name, kernel) for m, name in kernels]
    patches += [(mx.fast, name, fn) for name, fn in fast.items()]
    patches += [(mx, "dequantize", _dequantize_stand_in(counter, mx.dequantize))]
    patches += [(mx, "default_device", lambda: mx.Device(mx.gpu)), (mx.metal, "is_available", lambda: True)]
    saved = [(m, name, getattr(m, name)) for m, name, _ in patches]
    check = os.environ.get("MLX_FALCON_H1_KERNEL_CHECK")
    try:
        for module, name, value in patches:
            setattr(module, name, value)
        os.environ["MLX_FALCON_H1_KERNEL_CHECK"] = "0"  # nothing to check against here
        yield counter
    finally:
        for module, name, value in saved:
            setattr(module, name, value)
        if check is None:
            os.environ.pop("MLX_FALCON_H1_KERNEL_CHECK", None)
        else:
            os.environ["MLX_FALCON_H1_KERNEL_CHECK"] = check


class Graph(NamedTuple):
    """A step's graph as mx.export_to_dot writes it, arrays named by the dot file
    (the ones passed in `named` by that name)."""

    primitives: List[str]  # one per node
    outputs: List[List[str]]  # per node, the arrays it makes
    readers: Dict[str, List[int]]  # array name -> the nodes that take it as input


def read_graph(outputs: List[mx.array], named: Dict[str, mx.array] = None) -> Graph:
    with tempfile.TemporaryDirectory() as tmp:
        dot = os.path.join(tmp, "graph.dot")
        mx.export_to_dot(dot, *outputs, **(named or {}))
        lines = open(dot).read().splitlines()
    # A node's line names it by its primitive's address, which calls of one
    # compiled function share, so the lines are read in order: each node's
    # arrows follow its own line.
    graph = Graph([], [], defaultdict(list))
    for line in lines:
        node = re.match(r'\{ \d+ \[label ="([^"]+)"', line)
        reads = re.match(r'^"([^"]+)" -> \d+$', line)
        makes = re.match(r'^\d+ -> "([^"]+)"$', line)
        if node:
            graph.primitives.append(node.group(1))
            graph.outputs.append([])
        elif reads:
            graph.readers[reads.group(1)].append(len(graph.primitives) - 1)
        elif makes:
            graph.outputs[-1].append(makes.group(1))
    return graph


def count_launches(outputs: List[mx.array]) -> Counter:
    """The launching primitives in the graph that computes `outputs`, by name."""
    return _launches(read_graph(outputs))


def _launches(graph: Graph) -> Counter:
    return Counter(p for p in graph.primitives if p not in VIEWS)


# Views that keep every element of their input: a weight seen through one (a
# Linear's transposed weight) is still the whole weight. Slices are left out, so
# the stand-ins' one-element views lead nowhere.
WHOLE_VIEWS = {"Transpose", "Reshape", "ExpandDims", "Squeeze", "Flatten", "Unflatten"}


def _uses(graph: Graph, name: str) -> List[str]:
    """The primitives that read array `name`, or a whole view of it."""
    uses, names = [], [name]
    while names:
        for node in graph.readers.get(names.pop(), []):
            if graph.primitives[node] in WHOLE_VIEWS:
                names += graph.outputs[node]
            else:
                uses.append(graph.primitives[node])
    return uses


def weight_traffic(graph: Graph, parameters: Dict[str, mx.array]) -> Dict:
    """What one decode step does to the weights, from a graph whose inputs are
    named after `parameters` (name -> array): the parameters it casts, and the
    bytes it reads from weights per token.

    Bytes read per token, an approximation: every parameter the step reads,
    whole, except one that is only gathered from (an embedding table looked up,
    not also the tied head), of which one row (a one-token step); plus each
    cast's output, written once and read once by the op that needed it. A
    cast's output dtype is not in the dot file: it is taken as float32 (4
    bytes) for a 2-byte parameter, the only wider float type (MLX casts up to
    the wider type when dtypes meet), and 2 bytes for a float32 parameter (an
    explicit cast down). The cache's state and K/V are not included
    (mac_speed_model.state_bytes_per_token adds them).
    """
    casts, read = Counter(), 0
    for name, array in parameters.items():
        uses = _uses(graph, name)
        if not uses:
            continue
        gathered = all(u == "Gather" for u in uses)
        read += array.nbytes // array.shape[0] if gathered else array.nbytes
        if "AsType" in uses:
            casts[name] = uses.count("AsType")
            read += casts[name] * 2 * array.size * (2 if array.dtype == mx.float32 else 4)
    return {"weight_casts": sum(casts.values()), "cast_parameters": dict(casts), "weight_bytes_read": read}


def decode_step_launches(model, step: Callable = None, prompt_tokens: int = 8,
                         kv_bits: Optional[int] = None, kv_group_size: int = 64) -> Dict:
    """Launching primitives, weight casts and weight bytes read of one decode step
    of `model` (ours, or any model with mlx-lm's interface: a consumer's model
    loaded from a folder) as on a Mac.

    The cache (make_prompt_cache's) is filled by a short prompt first, then with
    kv_bits quantized as mlx-lm's --kv-bits quantizes it (to_quantized); `step(model,
    token, cache)` makes the step's logits (default: model(token, cache=cache)).
    Returns {"total", "per_layer" (total / layers), "by_primitive", and
    weight_traffic's "weight_casts" (AsType nodes reading a parameter),
    "cast_parameters" (name -> casts) and "weight_bytes_read"; "kernel_inputs":
    per custom kernel or mx.fast op launched, the arrays it read}.
    """
    cache = make_prompt_cache(model)
    vocab = model.model.embed_tokens.weight.shape[0]
    prompt = mx.arange(prompt_tokens)[None] % vocab
    token = mx.array([[1]])
    with as_on_a_mac() as kernels:
        # The prompt runs on the Mac's path too (its stand-ins evaluate, to
        # meaningless values of the right shapes and dtypes): the CPU's path
        # leaves states in other dtypes (float32 where the Mac's are bfloat16),
        # which would send the step down another path than a Mac's.
        mx.eval(model(prompt, cache=cache), [c.state for c in cache])
        if kv_bits is not None:  # mlx-lm's maybe_quantize_kv_cache, outside the step
            cache = [c.to_quantized(group_size=kv_group_size, bits=kv_bits) for c in cache]
            mx.eval([_cache_arrays(c) for c in cache])
        kernels.launches, kernels.inputs = 0, []
        logits = step(model, token, cache) if step else model(token, cache=cache)
        outputs = [logits] + [a for c in cache for a in _cache_arrays(c)]
        parameters = dict(tree_flatten(model.parameters()))
        graph = read_graph(outputs, parameters)
    counts = _launches(graph)
    counts["custom kernels and mx.fast ops"] = kernels.launches
    total = sum(counts.values())
    return {"total": total, "per_layer": total / len(model.layers), "by_primitive": dict(counts),
            **weight_traffic(graph, parameters), "kernel_inputs": kernels.inputs}  # fmt: skip


def _cache_arrays(cache) -> List[mx.array]:
    """A cache's arrays after a step: ours as the step leaves them (its rollback rows
    unjoined: the join runs once per cache.ROLLBACK_JOIN_PARTS tokens, not per
    step), any other's from its `state`."""
    if hasattr(cache, "arrays"):
        return cache.arrays()
    return [a for _, a in tree_flatten(cache.state) if isinstance(a, mx.array)]


def our_decode_step(model, token, cache):
    """Our model's decode step as it runs by default, traced afresh (a compiled step
    already traced on this machine's CPU would replay the CPU's path)."""
    if decode.compiled_decode(model) is not None and decode.CompiledDecode.eligible(cache):
        step = decode.CompiledDecode(model)
        step.warm = True  # straight to the traced step (see CompiledDecode)
        return step(model, token, cache)
    return model.forward(token, cache)
