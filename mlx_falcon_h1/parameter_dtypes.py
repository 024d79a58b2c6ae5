"""Which of a Falcon-H1's parameters are its weights proper, and the dtypes of the rest.

The SSM parameters (A_log, D, dt_bias), conv1d and the norms are never
quantized and are computed with in float32 by this package; a folder stores them
in the dtype of its other weights, so that no other MLX app promotes its
activations to float32 (folder_format.py), unless it was converted with
--ssm-dtype float32. One rule for the converter, the loader, evaluation and the
memory planner.
"""

from typing import Dict

import mlx.core as mx


# The SSM parameters, conv and norms: parameter names containing any of these.
FLOAT32_PARAMETERS = ("A_log", "mamba.D", "dt_bias", "conv1d", "norm")


def castable(name: str) -> bool:
    """Whether parameter `name` is one of the model's weights proper (the one rule:
    our converter, evaluation and the memory planner); the rest are SSM
    parameters, conv and norms (FLOAT32_PARAMETERS)."""
    return not any(k in name for k in FLOAT32_PARAMETERS)


def is_ssm_parameter(name: str, w: mx.array) -> bool:
    """A floating tensor of the SSM parameters, conv or norms: the ones whose
    dtype a folder's layout (folder_format.SSM_DTYPES) decides."""
    return not castable(name) and mx.issubdtype(w.dtype, mx.floating)


def with_float32_parameters(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """`weights` with the SSM parameters, conv and norms in float32.

    What our runtime computes with, whatever dtype a folder stores them in: a
    bfloat16 norm weight would make the CPU's residual stream bfloat16 too
    (activation_dtype), and widening is exact, so a folder in either layout runs
    as the float32 layout with these values."""
    return {k: w.astype(mx.float32) if is_ssm_parameter(k, w) else w for k, w in weights.items()}


def weights_dtype(weights: Dict[str, mx.array]) -> mx.Dtype:
    """The dtype of a model's weights proper (the most common among the floating
    castable ones, quantized scales and biases included): the dtype activations
    have in an MLX consumer, so the one the SSM parameters, conv and norms must
    share for nothing to be promoted. bfloat16 when none is floating (fp-mode
    quantization: mx.dequantize's default)."""
    floats = [w.dtype for k, w in weights.items() if castable(k) and mx.issubdtype(w.dtype, mx.floating)]
    return max(set(floats), key=floats.count) if floats else mx.bfloat16


def layout_dtype(weights: Dict[str, mx.array], ssm_dtype: str) -> mx.Dtype:
    """The dtype a layout ("weights" or "float32") stores `weights`' SSM parameters, conv and norms in."""
    return mx.float32 if ssm_dtype == "float32" else weights_dtype(weights)
