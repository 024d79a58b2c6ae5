"""The Falcon-H1 checkpoint converter (installed as `mlx-falcon-h1-convert`)."""

# First, before mlx.core is imported: the package picks the BLAS (an installed
# OpenBLAS when there is one; ~10x faster matmuls on Linux, which calibration needs).
import mlx_falcon_h1  # noqa: F401  isort: skip

from .convert import convert, upgrade
from .folding import fold_multipliers

__all__ = ["convert", "fold_multipliers", "upgrade"]
