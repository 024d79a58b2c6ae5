"""Quantized layers for calibration: what is quantized, the affine grid, packing,
and the dequantize + matmul twins calibration computes with."""

from typing import List, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten


def quantizable(module: nn.Module, group_size: int) -> bool:
    """What the converter quantizes: Linear and Embedding layers whose input size
    fits the group size (conv1d, norms and the SSM parameters have no to_quantized)."""
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def fake_quantize(w: mx.array, bits: int, group_size: int) -> mx.array:
    """w rounded to the affine grid it would be stored on."""
    return mx.dequantize(*mx.quantize(w, group_size=group_size, bits=bits), group_size=group_size, bits=bits)


def pack(q: np.ndarray, bits: int) -> mx.array:
    """Integers q (O, I) in [0, 2**bits) packed as MLX's affine quantization stores
    them: a little-endian bit stream per row, read as uint32 (checked in the tests)."""
    q = np.asarray(q, dtype=np.uint32)
    out = []
    for rows in np.array_split(q, max(1, q.size // (1 << 22)), axis=0):  # bounds the bit array
        bits_arr = ((rows[..., None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
        packed = np.packbits(bits_arr.reshape(rows.shape[0], -1), axis=-1, bitorder="little")
        out.append(packed.view(np.uint32))
    return mx.array(np.concatenate(out, axis=0))


class DequantizedLinear(nn.Module):
    """A QuantizedLinear computed as dequantize + matmul, with the same parameter
    names. On the CPU, MLX's quantized matmul is ~20x slower than dequantizing and
    calling BLAS (measured here: 3.2 s vs 0.13 s for 2040 x 256 @ 256 x 4096),
    and the dequantized form is differentiable in scales and biases (DWQ)."""

    def __init__(self, q: nn.QuantizedLinear):
        super().__init__()
        self.group_size, self.bits = q.group_size, q.bits
        self.weight, self.scales, self.biases = q.weight, q.scales, q.biases
        if "bias" in q:
            self.bias = q.bias

    def dense(self) -> mx.array:
        w = mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)
        return w.astype(mx.float32)

    def __call__(self, x):  # in float32: calibration's arithmetic, not bfloat16's
        y = x.astype(mx.float32) @ self.dense().T
        return y + self.bias if "bias" in self else y


class DequantizedEmbedding(DequantizedLinear):
    def __call__(self, ids):
        return mx.dequantize(self.weight[ids], self.scales[ids], self.biases[ids],
                             group_size=self.group_size, bits=self.bits).astype(mx.float32)  # fmt: skip

    def as_linear(self, x):
        return x.astype(mx.float32) @ self.dense().T


def dequantized_form(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """Swap every affine-quantized leaf of `module` for its dequantize + matmul
    twin (same math, same parameter names); returns what to restore_modules()."""
    swapped = []
    for p, m in tree_flatten(module.leaf_modules(), is_leaf=nn.Module.is_module):
        if isinstance(m, nn.QuantizedLinear) and m.mode == "affine":
            swapped.append((p, m))
            set_module(module, p, DequantizedLinear(m))
        elif isinstance(m, nn.QuantizedEmbedding) and m.mode == "affine":
            swapped.append((p, m))
            set_module(module, p, DequantizedEmbedding(m))
    return swapped


def restore_modules(module: nn.Module, swapped: List[Tuple[str, nn.Module]]) -> None:
    """Put the quantized modules back, with the twins' (possibly learned) parameters."""
    for p, original in swapped:
        twin = module_at(module, p)
        original.update({k: twin[k] for k in ("scales", "biases")})
        set_module(module, p, original)


def quantized_linear(layer: nn.Linear, q, scales, biases, bits, group_size) -> nn.QuantizedLinear:
    """`layer` as a QuantizedLinear storing the integers q (O, I), with its bias."""
    out_dims, in_dims = layer.weight.shape
    ql = nn.QuantizedLinear(in_dims, out_dims, bias="bias" in layer, group_size=group_size, bits=bits)
    ql.weight, ql.scales, ql.biases = pack(q, bits), scales, biases
    if "bias" in layer:
        ql.bias = layer.bias
    return ql


def set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at the dotted `path` under `root` ("mamba.in_proj", "layers.3.mlp")."""
    root.update_modules(tree_unflatten([(path, module)]))


def module_at(root: nn.Module, path: str) -> nn.Module:
    """The module at the dotted `path` under `root`."""
    for key in path.split("."):
        root = root[int(key)] if isinstance(root, list) else root[key]
    return root


def to_float32(module: nn.Module) -> dict:
    """Cast `module`'s floating parameters to float32 in place; returns the originals."""
    originals = module.parameters()
    module.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, originals))
    return originals
