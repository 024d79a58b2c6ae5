"""mlx-falcon-h1: TII's Falcon-H1 language models on Apple Silicon with MLX."""

# Two process settings, made here because importing the package is the only
# moment every use of it passes through before MLX allocates or multiplies:
# - on Linux, let an installed OpenBLAS serve MLX's CPU matmuls. It must be
#   loaded before mlx.core is imported, which binds its BLAS symbols then and
#   never again (blas.py; MLX_FALCON_H1_BLAS=0 opts out);
# - keep freed memory for the next arrays instead of faulting in fresh pages
#   (allocator.py; MLX_FALCON_H1_MALLOC=0 opts out), for every array: a model
#   built with Model(args) as much as one from load().
# mlx-lm's patches are not installed here: load_model() and the commands do
# that (mlx_lm_patches.py).
from .allocator import keep_freed_memory
from .blas import prefer_optimized_blas

prefer_optimized_blas()
keep_freed_memory()

from .config import ConfigError, ModelArgs  # noqa: E402
from .loading import CheckpointError, load, load_model  # noqa: E402
from .model import Model  # noqa: E402

__all__ = ["CheckpointError", "ConfigError", "Model", "ModelArgs", "load", "load_model"]
