"""The README's main command runs generation through our model."""

import os
import subprocess
import sys

import mlx.core as mx
from mlx_lm.generate import generate

from conftest import make_checkpoint, make_tokenizer
from mlx_falcon_h1 import Model, load


def test_load_returns_model_and_tokenizer(tmp_path):
    make_checkpoint(tmp_path)
    make_tokenizer(tmp_path)
    model, tokenizer = load(str(tmp_path))
    assert isinstance(model, Model)
    ids = tokenizer.encode("def return if")
    assert model(mx.array([ids])).shape == (1, len(ids), 96)


def test_generate_command_matches_in_process_greedy(tmp_path):
    make_checkpoint(tmp_path)
    make_tokenizer(tmp_path)
    model, tokenizer = load(str(tmp_path))
    expected = generate(model, tokenizer, "def return if", max_tokens=12)

    cmd = [sys.executable, "-m", "mlx_falcon_h1.generate", "--model", str(tmp_path)]
    cmd += ["--prompt", "def return if", "--max-tokens", "12", "--temp", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert expected.strip() and expected.strip() in done.stdout  # (mlx-lm's own lines around it are its business)


def test_readme_command_runs_the_shipped_model():
    """The README's first command: no --model, the trained tiny model answers."""
    cmd = [sys.executable, "-m", "mlx_falcon_h1.generate", "--prompt", "def fibonacci(n):"]
    done = subprocess.run(cmd + ["--max-tokens", "40"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    text = done.stdout  # the answer, between mlx-lm's separators and statistics (its format, not ours)
    # Python-looking: an indented body with Python keywords or a docstring.
    assert "\n    " in text and any(k in text for k in ("return", '"""', "if ", "self"))
