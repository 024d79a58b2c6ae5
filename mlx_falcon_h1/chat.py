"""`python -m mlx_falcon_h1.chat`: mlx-lm's chat REPL (same flags) on our Falcon-H1."""

from .commands import run_mlx_lm_command

if __name__ == "__main__":
    from .cli import run

    run(lambda: run_mlx_lm_command("chat"))
