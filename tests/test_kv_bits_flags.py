"""--kv-bits / --kv-group-size that cannot quantize the model's K/V are refused
before anything is generated, in one line naming head_dim and what would work
(kv_quantization.py, commands.check_kv_flags); combinations that work still
generate. mlx-lm would fail --quantized-kv-start tokens into the answer."""

import mlx.core as mx
import pytest

from mlx_falcon_h1.kv_quantization import (
    AFFINE_BITS,
    AFFINE_GROUP_SIZES,
    KVQuantizationError,
    check_kv_quantization,
)


def _quantizes(head_dim, bits, group_size) -> bool:
    try:
        mx.eval(mx.quantize(mx.zeros((1, 2, 3, head_dim)), group_size=group_size, bits=bits))
        return True
    except ValueError:
        return False


def _accepted(head_dim, bits, group_size) -> bool:
    try:
        check_kv_quantization(head_dim, bits, group_size)
        return True
    except KVQuantizationError:
        return False


def test_the_check_agrees_with_mx_quantize():
    """The check accepts exactly what mx.quantize (affine) takes, so the lists it
    names follow MLX, not a guess (and a release that changes them fails here)."""
    for head_dim in (24, 48, 64, 96, 128, 256):
        for bits in range(0, 10):
            for group_size in (-64, 16, 32, 48, 64, 96, 128, 256):
                assert _accepted(head_dim, bits, group_size) == _quantizes(
                    head_dim, bits, group_size), (head_dim, bits, group_size)
    # A group size of 0 is refused too: mx.quantize divides by it (the process dies).
    assert not _accepted(64, 8, 0)
    assert AFFINE_BITS == tuple(b for b in range(0, 10) if _quantizes(768, b, 64))
    assert AFFINE_GROUP_SIZES == tuple(g for g in (16, 32, 48, 64, 96, 128, 256, 384)
                                       if _quantizes(768, 4, g))


@pytest.mark.parametrize("head_dim, bits, group_size, message", [
    (48, 8, 64, "--kv-bits cannot be used with this model: MLX quantizes the K/V in groups "
                "of 32, 64 or 128 values along the attention head_dim, and none of these "
                "divides this model's head_dim 48"),
    (64, 8, 128, "--kv-group-size 128: 128 does not divide this model's attention head_dim 64; "
                 "with head_dim 64 use --kv-group-size 32 or 64"),
    (96, 4, 48, "--kv-group-size 48: MLX quantizes in groups of 32, 64 or 128 values; with "
                "head_dim 96 use --kv-group-size 32"),
    (64, 7, 64, "--kv-bits 7: MLX quantizes the K/V with 1, 2, 3, 4, 5, 6 or 8 bits"),
])
def test_the_message_names_head_dim_and_what_works(head_dim, bits, group_size, message):
    with pytest.raises(KVQuantizationError) as refused:
        check_kv_quantization(head_dim, bits, group_size)
    assert str(refused.value) == message
