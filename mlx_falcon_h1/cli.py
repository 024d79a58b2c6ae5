"""How every command of the package ends on a user's mistake: one line, not a traceback.

A user error is an exception the package raised on purpose, with a message
written for the user (a missing folder, a Hub id while offline, a checkpoint or
config it refuses: CheckpointError, ConfigError, PromptCacheError and the other
ValueErrors of its `raise` statements), or a file the user named on the command
line that cannot be opened. It prints `error: <message>` on stderr and exits 2,
argparse's code for a bad command line. Anything else is a programming error
and keeps its traceback: MLX raises ValueError for shapes that do not broadcast,
so the type alone cannot tell the two apart; where the exception was raised can.
"""

import linecache
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, List, NoReturn, Optional, Sequence

from .loading import read_checkpoint

USER_ERROR_EXIT = 2

_PACKAGE_DIR = Path(__file__).resolve().parent


def run(main: Callable[[], object], argv: Optional[Sequence[str]] = None) -> NoReturn:
    """Call an entry point and exit: with main's status if it returns an int (0
    otherwise), or with USER_ERROR_EXIT and one `error:` line on a user error.

    argv: the command's arguments (default sys.argv[1:]), where user paths are
    looked for. The code of main's own package counts as ours too (the
    converter installs as a package of its own)."""
    status = call(main, argv)
    # bool is an int: a main that returns True means done, not exit status 1
    sys.exit(status if isinstance(status, int) and not isinstance(status, bool) else 0)


def call(main: Callable[[], object], argv: Optional[Sequence[str]] = None):
    """main()'s result; on a user error, one `error:` line and exit USER_ERROR_EXIT.
    For a `main(argv)` that Python code calls too and that returns as mlx-lm's do."""
    try:
        return main()
    except Exception as e:
        argv = sys.argv[1:] if argv is None else argv
        if not is_user_error(e, argv, _our_dirs(main)):
            raise
        print(f"error: {describe(e)}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)


def read_model_first(argv: Sequence[str]) -> None:
    """Read (not load) the checkpoint named by --model, for a command that loads
    it on another thread: mlx-lm's server does so on its generation thread, where
    a refused checkpoint ends that thread with a traceback and leaves the HTTP
    server up, answering nothing. Reading it here first ends the command with
    run's one line instead. Cheap: the tensors are opened lazily, never
    evaluated; a Hub id is fetched now rather than on that thread."""
    model = _flag_value(argv, "--model")
    if model is not None:
        read_checkpoint(model)


def is_user_error(error: BaseException, argv: Iterable[str], our_dirs: Iterable[Path] = ()) -> bool:
    """Whether `error` is meant for the user (see the module docstring)."""
    if isinstance(error, OSError) and error.filename is not None:
        if _named_on_command_line(error.filename, argv):
            return True
    if not isinstance(error, (ValueError, OSError)):
        return False
    return _raised_by_us(error, [_PACKAGE_DIR, *our_dirs])


def describe(error: BaseException) -> str:
    """The message, without Python's decoration ("[Errno 2] ...")."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error) or type(error).__name__


def _raised_by_us(error: BaseException, dirs: List[Path]) -> bool:
    # The innermost frame is where the exception started. A `raise` statement
    # there, in our files, is a message written on purpose; any other line is
    # a call (into MLX, NumPy ...) that failed on its own.
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = Path(tb.tb_frame.f_code.co_filename).resolve()
    if not any(filename.is_relative_to(d) for d in dirs):
        return False
    return linecache.getline(str(filename), tb.tb_lineno).lstrip().startswith("raise")


def _named_on_command_line(filename, argv: Iterable[str]) -> bool:
    """`filename` is one of the command's arguments, or inside one (a folder)."""
    target = os.path.normpath(os.fspath(filename))
    values = [v for arg in argv for v in {arg, arg.split("=", 1)[-1]}]  # --flag=value too
    for value in values:
        if not value or value.startswith("-"):
            continue
        value = os.path.normpath(os.path.expanduser(value))
        if target == value or target.startswith(value.rstrip(os.sep) + os.sep):
            return True
    return False


def _flag_value(argv: Sequence[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _our_dirs(main: Callable) -> List[Path]:
    module = sys.modules.get(getattr(main, "__module__", None) or "")
    source = getattr(module, "__file__", None)
    return [Path(source).resolve().parent] if source else []
