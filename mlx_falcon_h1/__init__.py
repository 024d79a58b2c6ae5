"""mlx-falcon-h1: TII's Falcon-H1 language models on Apple Silicon with MLX."""

from .loading import CheckpointError, load, load_model
from .model import ConfigError, Model, ModelArgs

__all__ = ["CheckpointError", "ConfigError", "Model", "ModelArgs", "load", "load_model"]
