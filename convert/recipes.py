"""Mixed-precision quantization recipes (`--quant-predicate`).

mlx-lm's recipes (after llama.cpp's Q4_K_M choices) keep v_proj, down_proj in
some layers and lm_head at higher bits; Falcon-H1's module names match theirs,
so they apply unchanged.

Ours follow a measurement instead (examples/quant_sensitivity.py on the trained
tiny model, 3-bit affine g32, one class of layers quantized at a time, mean KL
from the float model on 2047 held-out tokens): lm_head 0.019, embed_tokens 0.012,
mamba.in_proj 0.0046, feed_forward.down_proj 0.0043, gate_proj 0.0020, up_proj
0.0017, mamba.out_proj 0.0014, v_proj 0.0004, q/k/o_proj 0.0002 (all at once:
0.049). in_proj makes dt, B and C, whose errors the SSM carries along the
sequence. `falcon_mixed_<low>_<high>` keeps the top four classes at <high> bits.
"""

from typing import Callable, Optional

import mlx.nn as nn
from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder

SENSITIVE = ("embed_tokens", "lm_head", "mamba.in_proj", "feed_forward.down_proj")
FALCON_RECIPES = {"falcon_mixed_3_6": (3, 6), "falcon_mixed_4_8": (4, 8)}
RECIPES = list(QUANT_RECIPES) + list(FALCON_RECIPES)


def make_recipe(name: str, model: nn.Module, group_size: Optional[int], mode: str) -> Callable:
    assert mode == "affine", mode  # the converter refuses other modes before reading anything
    group_size = group_size or 64
    if name not in FALCON_RECIPES:
        return mixed_quant_predicate_builder(name, model, group_size)
    low, high = FALCON_RECIPES[name]

    def predicate(path: str, module: nn.Module):
        bits = high if path.endswith(SENSITIVE) else low
        return {"group_size": group_size, "bits": bits, "mode": "affine"}

    return predicate
