"""`python -m mlx_falcon_h1.chat`: mlx-lm's chat REPL (same flags) on our Falcon-H1.

One difference: Ctrl-D (or the end of piped input) and Ctrl-C at the prompt
quit as `q` does, where mlx-lm's ends in an EOFError / KeyboardInterrupt traceback.
"""

from mlx_lm.cli_ui import ChatUI as MlxLmChatUI

from .commands import run_mlx_lm_command


class ChatUI(MlxLmChatUI):
    """mlx-lm's chat UI, reading the end of input at the prompt as `q`."""

    def prompt(self) -> str:
        try:
            return super().prompt()
        except (EOFError, KeyboardInterrupt):
            return "q"


def main():
    run_mlx_lm_command("chat", ChatUI=ChatUI)


if __name__ == "__main__":
    from .cli import run

    run(main)
