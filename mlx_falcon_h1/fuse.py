"""`python -m mlx_falcon_h1.fuse`: mlx-lm's fuse (same flags) for adapters trained with
`python -m mlx_falcon_h1.lora`; the fused folder reloads to the same logits (see lora.save)."""

from .lora import fuse_main

if __name__ == "__main__":
    from .cli import run

    run(fuse_main)
