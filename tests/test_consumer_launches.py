"""Stock mlx-lm's decode step on our default folder (issue 28): no more launches
per layer than on mlx-lm's own conversion of the same checkpoint, and no weight
cast per step, at bfloat16, 8-bit and 4-bit.

The trained fixture is a bfloat16 checkpoint, as TII's are, and every width of
it is a multiple of the group size, so every projection is quantized. The step
is counted as a Mac runs it (mlx_falcon_h1/launch_count.py). The float32 layout
(SSM parameters, conv1d and norms in float32) is the control that the counter
can fail: there a bfloat16 activation meets a float32 norm weight, the residual
stream turns float32 and every matmul casts its weights (or scales and biases)
each step.
"""

import mlx_lm
import pytest

import published as P
from mlx_falcon_h1.launch_count import decode_step_launches


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("consumer_launches")


def stock_step(folder):
    return decode_step_launches(mlx_lm.utils.load_model(folder)[0])


@pytest.mark.parametrize("bits", [None, 8, 4], ids=["bf16", "8-bit", "4-bit"])
def test_stock_mlx_lm_on_our_default_folder(work, bits):
    theirs = stock_step(P.make_folder(P.FIXTURE, work / f"mlx-lm-{bits}", "mlx-lm", bits))
    ours = stock_step(P.our_folder(P.FIXTURE, work / f"default-{bits}", P.DEFAULT_LAYOUT, bits))
    f32 = stock_step(P.our_folder(P.FIXTURE, work / f"float32-{bits}", P.FLOAT32_LAYOUT, bits))
    numbers = (f"launches per layer: ours {ours['per_layer']}, mlx-lm's own {theirs['per_layer']}, "
               f"float32 layout {f32['per_layer']}; weight casts per step: ours {ours['weight_casts']}, "
               f"mlx-lm's own {theirs['weight_casts']}, float32 layout {f32['weight_casts']}")  # fmt: skip
    assert ours["per_layer"] <= theirs["per_layer"], numbers
    assert ours["weight_casts"] == 0, f"{numbers}; cast: {ours['cast_parameters']}"
    assert ours["weight_bytes_read"] <= theirs["weight_bytes_read"], numbers
    # The control: the same counter sees the float32 layout's casts and launches.
    assert f32["weight_casts"] > 0 and f32["per_layer"] > theirs["per_layer"], numbers
    assert f32["weight_bytes_read"] > ours["weight_bytes_read"], numbers
