"""Which --kv-bits / --kv-group-size a model's attention K/V can be quantized with.

mlx-lm quantizes the K/V with mx.quantize (affine mode) along its last axis,
head_dim, in groups of --kv-group-size values. A combination MLX refuses fails
only when the cache is first quantized, --quantized-kv-start tokens into a
generation (5000 by default): mid-answer, with a traceback. Checked here
before anything is generated, by the commands and the cache alike; this module
imports nothing of the package's, so any of it can use it.
"""

from typing import Sequence

# What mx.quantize accepts in affine mode in mlx 0.32.4 (its errors list them;
# tests/test_kv_bits_flags.py asks mx.quantize itself, so a release that
# changes them shows).
AFFINE_BITS = (1, 2, 3, 4, 5, 6, 8)
AFFINE_GROUP_SIZES = (32, 64, 128)


class KVQuantizationError(ValueError):
    """--kv-bits / --kv-group-size that cannot quantize this model's K/V."""


def working_group_sizes(head_dim: int) -> list:
    """The group sizes MLX supports that divide head_dim (none for head_dim 48)."""
    return [g for g in AFFINE_GROUP_SIZES if head_dim % g == 0]


def check_kv_quantization(head_dim: int, bits: int, group_size: int) -> None:
    """Raise KVQuantizationError, naming head_dim and what would work, unless
    mx.quantize can quantize K/V of this head_dim with these bits and group size."""
    if bits not in AFFINE_BITS:
        raise KVQuantizationError(
            f"--kv-bits {bits}: MLX quantizes the K/V with {_either(AFFINE_BITS)} bits")
    working = working_group_sizes(head_dim)
    if not working:
        raise KVQuantizationError(
            f"--kv-bits cannot be used with this model: MLX quantizes the K/V in groups of "
            f"{_either(AFFINE_GROUP_SIZES)} values along the attention head_dim, and none of "
            f"these divides this model's head_dim {head_dim}")
    if group_size not in working:
        why = (f"MLX quantizes in groups of {_either(AFFINE_GROUP_SIZES)} values"
               if group_size not in AFFINE_GROUP_SIZES
               else f"{group_size} does not divide this model's attention head_dim {head_dim}")
        raise KVQuantizationError(
            f"--kv-group-size {group_size}: {why}; with head_dim {head_dim} use "
            f"--kv-group-size {_either(working)}")


def _either(values: Sequence[int]) -> str:
    values = [str(v) for v in values]
    return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
