"""Tiny random Falcon-H1 checkpoints made with transformers, the numerical reference."""

# First, before any test module imports mlx.core: on Linux it picks MLX's BLAS
# (mlx_falcon_h1/blas.py), so the tests run what a user runs.
import mlx_falcon_h1  # noqa: F401
from mlx_falcon_h1 import mlx_lm_patches

# Test modules take mlx-lm's functions by name when they are imported, before any
# load_model() installs this package's patches of mlx-lm: install them first, as
# a program that does the same must (mlx_lm_patches.py).
mlx_lm_patches.install()

import json
import socket
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import FalconH1Config, FalconH1ForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()  # the "mamba_ssm not installed" notices are expected

# Falcon-H1-0.5B's muP multipliers (its config.json): the realistic setting.
MUP_05B = dict(
    embedding_multiplier=5.656854249492381,
    lm_head_multiplier=0.0390625,
    key_multiplier=0.39062499999999994,
    attention_in_multiplier=1.0,
    attention_out_multiplier=0.9375,
    ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.23570226039551587,
    mlp_multipliers=[0.8838834764831844, 0.5859375],
    ssm_multipliers=[0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
)

# Odd multipliers: none equal to 1, none equal to each other, so a multiplier
# applied to the wrong tensor (or dropped, as mlx-lm drops key_multiplier) shows.
ODD_MUP = dict(
    embedding_multiplier=3.1,
    lm_head_multiplier=0.21,
    key_multiplier=0.43,
    attention_in_multiplier=0.7,
    attention_out_multiplier=1.3,
    ssm_in_multiplier=0.8,
    ssm_out_multiplier=1.7,
    mlp_multipliers=[1.9, 0.35],
    ssm_multipliers=[0.6, 1.4, 0.45, 2.2, 0.9],
)

# Small, but every size distinct so a transposed or mis-split tensor cannot fit:
# head_dim 24 != hidden / heads = 16; chunk 16 so short prompts span chunks.
TINY = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=24,
    mamba_d_ssm=96,
    mamba_n_heads=6,
    mamba_d_head="auto",
    mamba_n_groups=1,
    mamba_d_state=8,
    mamba_d_conv=4,
    mamba_chunk_size=16,
    rope_theta=1e11,
    **MUP_05B,
)


def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Replace transformers' structured init (A_log = log(1..H), D = 1, norms = 1)
    with random values, so a parameter used in the wrong place shows.

    Each tensor is drawn from NumPy's legacy RandomState seeded by `seed` and the
    parameter's name: NumPy freezes RandomState's streams, and a name stays put
    when a transformers release registers its parameters in another order, so a
    checkpoint (and the hashes tests/fixtures/published/manifest.json records of
    its conversions) is the same under any torch, NumPy or transformers release.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            rs = np.random.RandomState([seed, zlib.crc32(name.encode())])
            if name.endswith("A_log"):
                # A = -exp(A_log) from -4.5 to -0.007: fast-forgetting heads and heads
                # whose state survives many chunks (strong decay alone hides carry bugs).
                values = rs.uniform(-5.0, 1.5, p.shape)
            elif name.endswith(("dt_bias", ".D")):
                values = rs.standard_normal(p.shape)
            elif "norm" in name:
                values = 1.0 + 0.3 * rs.standard_normal(p.shape)
            else:
                values = 0.15 * rs.standard_normal(p.shape)
            p.copy_(torch.from_numpy(values.astype(np.float32)))


def make_checkpoint(path: Path, seed: int = 0, max_shard_size=None, **overrides):
    """Write a random FalconH1ForCausalLM (float32) to `path`; return the torch model."""
    config = FalconH1Config(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = FalconH1ForCausalLM(config).float().eval()
    randomize(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    return model


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def edit_config(path: Path, **changes) -> None:
    file = path / "config.json"
    config = json.loads(file.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    file.write_text(json.dumps(config))


def assert_close_logits(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    """The project's parity bar: max |diff| <= rel * max |reference logit|."""
    assert ours.shape == ref.shape
    worst = float(np.abs(ours - ref).max())
    bound = rel * float(np.abs(ref).max())
    assert worst <= bound, f"max |diff| {worst:.3g} > {bound:.3g} ({rel} x max |ref|)"


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def make_tokenizer(path: Path, vocab_size: int = 96) -> None:
    """A word-level tokenizer of `vocab_size` entries saved beside a checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    words = "def return if else for in while import class self print None True False".split()
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]
    )
    corpus = [" ".join(words[i:] + [f"w{j}" for j in range(i * 7, i * 7 + 7)]) for i in range(len(words))]
    tokenizer.train_from_iterator(corpus, trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    wrapped.save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*flags, env=None):
    """`python -m mlx_falcon_h1.server` with these flags on a free port, up until the
    block ends; yields the port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_falcon_h1.server", "--port", str(port),
                             *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(proc.stdout.read() if proc.poll() is not None else "no start")
                time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)
