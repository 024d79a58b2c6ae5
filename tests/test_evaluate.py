"""mlx_falcon_h1.evaluate: the windowing, perplexity, compare() and the CLI."""

import json
import math
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load_model
from mlx_falcon_h1.evaluate import (
    cast_model,
    compare,
    default_text_path,
    main,
    perplexity,
    torch_reference,
    windows,
)

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(
    "def return if else for in while import class self print None True False".split() * 12
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny checkpoint with a tokenizer, and a text file it can read."""
    path = tmp_path_factory.mktemp("tiny")
    make_checkpoint(path, seed=3)
    make_tokenizer(path)
    (path / "text.txt").write_text(TEXT)
    return path


@pytest.mark.parametrize("n, seq_len", [(2, 4), (9, 4), (10, 4), (11, 4), (100, 7)])
def test_windows_predict_each_token_once(n, seq_len):
    tokens = np.arange(n)
    wins = windows(tokens, seq_len)
    targets = np.concatenate([w[1:] for w in wins])
    assert targets.tolist() == list(range(1, n))
    assert all(2 <= len(w) <= seq_len + 1 for w in wins)
    # each window's first token is the previous window's last: no lost context step
    assert all(a[-1] == b[0] for a, b in zip(wins, wins[1:]))


def test_perplexity_of_known_distribution():
    """A 'model' that gives every token of a V-word vocabulary probability 1/V."""
    vocab = 50

    def uniform(ids):
        return mx.zeros((*ids.shape, vocab))

    tokens = np.arange(300) % vocab
    result = perplexity(uniform, tokens, seq_len=64, batch_size=3)
    assert result["tokens"] == 299
    assert math.isclose(result["perplexity"], vocab, rel_tol=1e-5)
    assert result["stderr"] == pytest.approx(0.0, abs=1e-6)


def test_compare_with_itself(tiny):
    model, _ = load_model(str(tiny))
    tokens = np.random.default_rng(0).integers(0, 96, size=120)
    result = compare(model, model, tokens, seq_len=32, batch_size=2)
    assert result["kl"] == pytest.approx(0.0, abs=1e-6)
    assert result["top1_agreement"] == 1.0
    assert result["max_logit_diff"] == 0.0
    assert result["tokens"] == 119
    assert result["perplexity"] == pytest.approx(result["reference_perplexity"])


def test_compare_with_transformers(tiny):
    """Our float32 model against transformers on the same checkpoint."""
    model, _ = load_model(str(tiny))
    cast_model(model, "float32")
    tokens = np.random.default_rng(1).integers(0, 96, size=80)
    result = compare(model, torch_reference(tiny), tokens, seq_len=32)
    assert result["kl"] < 1e-6  # float32 rounding gives ~1e-8; a real mismatch > 1e-3
    assert result["top1_agreement"] == 1.0
    assert abs(result["perplexity"] / result["reference_perplexity"] - 1) < 1e-5


def test_cast_keeps_ssm_parameters_in_float32(tiny):
    model, _ = load_model(str(tiny))
    cast_model(model, "bfloat16")
    mixer = model.layers[0].mamba
    assert mixer.in_proj.weight.dtype == mx.bfloat16
    assert mixer.A_log.dtype == mixer.D.dtype == mixer.dt_bias.dtype == mx.float32
    cast_model(model, "float32")
    assert mixer.in_proj.weight.dtype == mx.float32


def test_cli_writes_json(tiny, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "mlx_falcon_h1.evaluate", "--model", str(tiny)]
    cmd += ["--text", str(tiny / "text.txt"), "--seq-len", "16", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Perplexity:" in run.stdout
    report = json.loads(out.read_text())
    assert report["tokens"] > 16
    assert math.isclose(report["perplexity"], math.exp(report["loss"]))


def test_cli_reference_torch(tiny, tmp_path, capsys):
    out = tmp_path / "compare.json"
    args = ["--model", str(tiny), "--text", str(tiny / "text.txt"), "--dtype", "float32"]
    args += ["--reference", str(tiny), "--reference-backend", "torch", "--json", str(out)]
    args += ["--quiet", "--max-tokens", "64"]
    result = main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tokens"] == 63
    assert result["top1_agreement"] == 1.0 and result["kl"] < 1e-6
    assert "top-1 agreement" in capsys.readouterr().out


def test_default_text_is_shipped():
    text = default_text_path().read_text(encoding="utf-8")
    assert 50_000 < len(text.encode()) < 400_000
    assert "def " in text
