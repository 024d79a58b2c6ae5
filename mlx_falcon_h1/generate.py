"""`python -m mlx_falcon_h1.generate`: mlx-lm's generate command, running our Falcon-H1.

Same flags and behaviour as `mlx_lm.generate` (sampling, --max-tokens, chat
template, prompt-cache files, --draft-model ...). Only the loader differs, so the
model and any draft model run this package's implementation.
"""

from importlib import import_module

from .loading import load

# The module, not the `generate` function that mlx_lm's __init__ exports under its name.
mlx_lm_generate = import_module("mlx_lm.generate")


def main():
    parser = mlx_lm_generate.setup_arg_parser()
    args = parser.parse_args()
    if args.model is None and args.prompt_cache_file is None:
        parser.error("--model is required: name a Falcon-H1 checkpoint folder or Hub repo")
    mlx_lm_generate.load = load  # mlx-lm's main() looks its loader up at call time
    mlx_lm_generate.main()


if __name__ == "__main__":
    main()
