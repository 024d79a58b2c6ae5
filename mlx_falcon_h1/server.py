"""`python -m mlx_falcon_h1.server`: mlx-lm's OpenAI-compatible server (same flags,
continuous batching, prompt cache) on our Falcon-H1."""

from .commands import run_mlx_lm_command

if __name__ == "__main__":
    run_mlx_lm_command("server")
