"""`python -m mlx_falcon_h1.generate`: mlx-lm's generate command on our Falcon-H1.

Same flags and behaviour as `mlx_lm.generate` (sampling, --max-tokens, chat
template, prompt-cache files, --draft-model, --kv-bits ...). The model and any
draft model are built by this package's loader; without --model it runs the
small model shipped with the package.
"""

from .commands import run_mlx_lm_command


def main():
    run_mlx_lm_command("generate")


if __name__ == "__main__":
    from .cli import run

    run(main)
