"""The Falcon-H1 checkpoint converter (installed as `mlx-falcon-h1-convert`)."""

from .convert import convert, fold_multipliers, upgrade

__all__ = ["convert", "fold_multipliers", "upgrade"]
