"""Mixed-precision quantization recipes (`--quant-predicate`).

mlx-lm's recipes (after llama.cpp's Q4_K_M choices) keep v_proj, down_proj in
some layers and lm_head at higher bits; Falcon-H1's module names match theirs,
so they apply unchanged.
"""

from typing import Callable, Optional

import mlx.nn as nn
from mlx_lm.convert import QUANT_RECIPES, mixed_quant_predicate_builder

RECIPES = list(QUANT_RECIPES)


def make_recipe(name: str, model: nn.Module, group_size: Optional[int], mode: str) -> Callable:
    if mode != "affine":
        raise ValueError(f"--quant-predicate {name} mixes affine bit widths; use --q-mode affine")
    return mixed_quant_predicate_builder(name, model, group_size or 64)
