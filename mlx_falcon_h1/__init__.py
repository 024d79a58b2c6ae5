"""mlx-falcon-h1: TII's Falcon-H1 language models on Apple Silicon with MLX."""

# Before anything imports mlx.core: on Linux, let an installed OpenBLAS serve
# MLX's CPU matmuls (see blas.py; MLX_FALCON_H1_BLAS=0 opts out).
# And keep freed memory for the next arrays instead of faulting in fresh pages
# (see allocator.py; MLX_FALCON_H1_MALLOC=0 opts out).
from .allocator import keep_freed_memory
from .blas import prefer_optimized_blas

prefer_optimized_blas()
keep_freed_memory()

from .loading import CheckpointError, load, load_model  # noqa: E402
from .model import ConfigError, Model, ModelArgs  # noqa: E402

__all__ = ["CheckpointError", "ConfigError", "Model", "ModelArgs", "load", "load_model"]
