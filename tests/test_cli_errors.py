"""A user's mistake ends a command with one `error:` line and exit status 2;
a programming error keeps its traceback (mlx_falcon_h1/cli.py)."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest

from conftest import make_tokenizer
from mlx_falcon_h1 import cli
from mlx_falcon_h1.loading import CheckpointError, resolve_path

COMMANDS = {
    "generate": ["-m", "mlx_falcon_h1.generate", "--prompt", "def", "--max-tokens", "2", "--model"],
    "evaluate": ["-m", "mlx_falcon_h1.evaluate", "--model"],
    "convert": ["-m", "mlx_falcon_h1_convert", "--mlx-path", "out", "--hf-path"],
    # mlx-lm loads the server's model on its generation thread: checked before serving
    "server": ["-m", "mlx_falcon_h1.server", "--port", "0", "--model"],
}


def broken_config(folder):
    make_tokenizer(folder)  # so the loader gets as far as the config
    (folder / "config.json").write_text('{"model_type": "falcon_h1", ')  # cut short
    return "broken", "config.json: unreadable"


def missing_folder(folder):
    return "no_such_folder", "no_such_folder: no such folder"


def offline_hub_id(folder):
    return "no-such-org/no-such-model", "no-such-org/no-such-model: not a local folder, and fetching it"


@pytest.mark.parametrize("mistake", [missing_folder, offline_hub_id, broken_config])
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_user_error_is_one_line(command, mistake, tmp_path):
    model, message = mistake(tmp_path / "broken")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    # From a folder that is not the repository's: the commands must not depend on it.
    done = subprocess.run([sys.executable, *COMMANDS[command], model], capture_output=True,
                          text=True, cwd=tmp_path, env=env, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == cli.USER_ERROR_EXIT, done.stderr
    # Our refusal is one line, the last; a dependency's warning above it is its own
    # (a release may add one), but never a traceback.
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and "Traceback" not in done.stderr, done.stderr
    assert message in errors[0]
    assert not (tmp_path / "out").exists()


def test_evaluate_defaults_to_the_shipped_model(tmp_path):
    """Like generate: without --model, the model shipped in the package, from any folder."""
    cmd = [sys.executable, "-m", "mlx_falcon_h1.evaluate", "--max-tokens", "200", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    model_line = done.stdout.splitlines()[0]
    assert model_line.startswith("Model: ") and "default_model" in model_line
    assert "Perplexity:" in done.stdout


def test_user_error_in_process(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit:
        cli.run(lambda: resolve_path(str(tmp_path / "missing")))
    assert exit.value.code == cli.USER_ERROR_EXIT
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: no such folder\n"


def test_missing_file_named_by_the_user(capsys, tmp_path):
    missing = tmp_path / "text.txt"
    with pytest.raises(SystemExit) as exit:
        cli.run(lambda: missing.read_text(), argv=["--text", str(missing)])
    assert exit.value.code == cli.USER_ERROR_EXIT
    assert capsys.readouterr().err == f"error: {missing}: No such file or directory\n"
    # The same file, not named on the command line: a bug of the program's, traceback kept.
    with pytest.raises(FileNotFoundError):
        cli.run(lambda: missing.read_text(), argv=["--text", str(tmp_path / "other.txt")])


def test_programming_errors_keep_their_traceback():
    # MLX's ValueError for shapes that do not broadcast is not a message for the user.
    with pytest.raises(ValueError):
        cli.run(lambda: mx.zeros((2,)) + mx.zeros((3,)), argv=[])
    with pytest.raises(ZeroDivisionError):
        cli.run(lambda: 1 / 0, argv=[])


def test_a_raise_outside_the_package_is_not_ours():
    def main():
        raise ValueError("from a test, not from the package")

    error = None
    try:
        main()
    except ValueError as e:
        error = e
    assert not cli.is_user_error(error, [], [])
    assert cli.is_user_error(CheckpointError("x"), []) is False  # never raised: no traceback


@pytest.mark.parametrize("status, code", [(None, 0), (3, 3), (True, 0), ({"perplexity": 1.0}, 0)])
def test_exit_status(status, code):
    with pytest.raises(SystemExit) as exit:
        cli.run(lambda: status, argv=[])
    assert exit.value.code == code
