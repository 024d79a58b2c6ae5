"""--kv-bits / --kv-group-size that cannot quantize the model's K/V are refused
before anything is generated, in one line naming head_dim and what would work
(kv_quantization.py, commands.check_kv_flags); combinations that work still
generate. mlx-lm would fail --quantized-kv-start tokens into the answer."""

import shutil
import subprocess
import sys

import mlx.core as mx
import pytest
from mlx_lm.models.cache import save_prompt_cache

from conftest import make_checkpoint, make_tokenizer, running_server
from mlx_falcon_h1 import cli, load_model
from mlx_falcon_h1.commands import DEFAULT_MODEL
from mlx_falcon_h1.kv_quantization import (
    AFFINE_BITS,
    AFFINE_GROUP_SIZES,
    KVQuantizationError,
    check_kv_quantization,
)
from test_server import post

GENERATE = [sys.executable, "-m", "mlx_falcon_h1.generate", "--prompt", "def", "--max-tokens", "4"]
EVERY_K_V_FLAG = ["--kv-bits", "8", "--quantized-kv-start", "0"]


@pytest.fixture(scope="module")
def head_dim_64(tmp_path_factory):
    """A small model whose head_dim (64) groups of 32 and 64 divide, 128 not."""
    path = tmp_path_factory.mktemp("head_dim_64")
    make_checkpoint(path, head_dim=64, max_position_embeddings=256)
    make_tokenizer(path)
    return path


def _quantizes(head_dim, bits, group_size) -> bool:
    try:
        mx.eval(mx.quantize(mx.zeros((1, 2, 3, head_dim)), group_size=group_size, bits=bits))
        return True
    except ValueError:
        return False


def _accepted(head_dim, bits, group_size) -> bool:
    try:
        check_kv_quantization(head_dim, bits, group_size)
        return True
    except KVQuantizationError:
        return False


def test_the_check_agrees_with_mx_quantize():
    """The check accepts exactly what mx.quantize (affine) takes, so the lists it
    names follow MLX, not a guess (and a release that changes them fails here)."""
    for head_dim in (24, 48, 64, 96, 128, 256):
        for bits in range(0, 10):
            for group_size in (-64, 16, 32, 48, 64, 96, 128, 256):
                assert _accepted(head_dim, bits, group_size) == _quantizes(
                    head_dim, bits, group_size), (head_dim, bits, group_size)
    # A group size of 0 is refused too: mx.quantize divides by it (the process dies).
    assert not _accepted(64, 8, 0)
    assert AFFINE_BITS == tuple(b for b in range(0, 10) if _quantizes(768, b, 64))
    assert AFFINE_GROUP_SIZES == tuple(g for g in (16, 32, 48, 64, 96, 128, 256, 384)
                                       if _quantizes(768, 4, g))


@pytest.mark.parametrize("head_dim, bits, group_size, message", [
    (48, 8, 64, "--kv-bits cannot be used with this model: MLX quantizes the K/V in groups "
                "of 32, 64 or 128 values along the attention head_dim, and none of these "
                "divides this model's head_dim 48"),
    (64, 8, 128, "--kv-group-size 128: 128 does not divide this model's attention head_dim 64; "
                 "with head_dim 64 use --kv-group-size 32 or 64"),
    (96, 4, 48, "--kv-group-size 48: MLX quantizes in groups of 32, 64 or 128 values; with "
                "head_dim 96 use --kv-group-size 32"),
    (64, 7, 64, "--kv-bits 7: MLX quantizes the K/V with 1, 2, 3, 4, 5, 6 or 8 bits"),
])
def test_the_message_names_head_dim_and_what_works(head_dim, bits, group_size, message):
    with pytest.raises(KVQuantizationError) as refused:
        check_kv_quantization(head_dim, bits, group_size)
    assert str(refused.value) == message


def _assert_refused(done, *parts):
    """One `error:` line (the last), exit status 2, no traceback, nothing generated."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == cli.USER_ERROR_EXIT, done.stderr
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""  # mlx-lm prints its "==========" before the first token
    for part in parts:
        assert part in lines[-1], lines[-1]


def test_generate_refuses_the_shipped_model(tmp_path):
    """The new user's command: head_dim 48, which no group size divides."""
    done = subprocess.run(GENERATE + EVERY_K_V_FLAG, capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    _assert_refused(done, f"error: {DEFAULT_MODEL}: --kv-bits cannot be used with this model",
                    "head_dim 48")


@pytest.mark.parametrize("flags, parts", [
    (["--kv-bits", "8", "--kv-group-size", "128"], ["use --kv-group-size 32 or 64"]),
    (["--kv-bits=8", "--kv-group-size=128"], ["use --kv-group-size 32 or 64"]),
    (["--kv-bits", "7"], ["--kv-bits 7: MLX quantizes the K/V with 1, 2, 3, 4, 5, 6 or 8 bits"]),
])
def test_generate_refuses_a_group_size_or_bits(head_dim_64, flags, parts):
    # The default --quantized-kv-start: mlx-lm would have failed 5000 tokens in.
    done = subprocess.run(GENERATE + ["--model", str(head_dim_64), *flags],
                          capture_output=True, text=True, timeout=120)
    _assert_refused(done, f"error: {head_dim_64}: ", *parts)


def test_generate_refuses_a_draft_model_it_cannot_quantize(head_dim_64):
    """mlx-lm quantizes the draft model's K/V too."""
    done = subprocess.run(GENERATE + ["--model", str(head_dim_64), "--draft-model",
                                      str(DEFAULT_MODEL), *EVERY_K_V_FLAG],
                          capture_output=True, text=True, timeout=120)
    _assert_refused(done, f"error: {DEFAULT_MODEL}: ", "head_dim 48")


def test_generate_refuses_the_model_of_a_prompt_cache_file(tmp_path):
    """Without --model, the model is the one the prompt-cache file names: checked as it loads."""
    model = load_model(DEFAULT_MODEL)[0]
    cache = model.make_cache()
    mx.eval(model(mx.array([[5, 6, 7]]), cache=cache))
    file = tmp_path / "prompt.safetensors"
    save_prompt_cache(str(file), cache, {"model": str(DEFAULT_MODEL), "chat_template": "",
                                         "tokenizer_config": "{}"})
    done = subprocess.run(GENERATE + ["--prompt-cache-file", str(file), *EVERY_K_V_FLAG],
                          capture_output=True, text=True, timeout=120)
    _assert_refused(done, f"error: {DEFAULT_MODEL}: --kv-bits cannot be used", "head_dim 48")


def test_generate_quantizes_what_works(head_dim_64):
    """With the default --kv-group-size, 64 (the server's test takes 32)."""
    done = subprocess.run(GENERATE + ["--model", str(head_dim_64), *EVERY_K_V_FLAG],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    answer = done.stdout.split("==========")[1]  # mlx-lm's lines around the answer
    assert answer.strip(), done.stdout


def test_chat_has_no_kv_bits(tmp_path):
    """mlx-lm's chat takes no --kv-bits: its parser says so, not a refusal of the model."""
    done = subprocess.run([sys.executable, "-m", "mlx_falcon_h1.chat", *EVERY_K_V_FLAG],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "unrecognized arguments: --kv-bits 8" in done.stderr.splitlines()[-1], done.stderr


def test_server_refuses_at_startup(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mlx_falcon_h1.server", "--port", "0",
                           *EVERY_K_V_FLAG], capture_output=True, text=True, cwd=tmp_path,
                          timeout=60)  # a server not refused would run on
    _assert_refused(done, f"error: {DEFAULT_MODEL}: --kv-bits cannot be used", "head_dim 48")


def test_server_refuses_a_request_for_another_model_and_serves_on(head_dim_64, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(head_dim_64, served)
    with running_server("--model", str(served), "--kv-group-size", "32",
                        *EVERY_K_V_FLAG) as port:
        ask = {"prompt": "def return", "max_tokens": 4, "temperature": 0.0}
        status, first = post(port, "/v1/completions", ask)
        assert status == 200 and first["choices"][0]["text"].strip(), first
        # The served model stays loaded through the refusal: were it dropped
        # (mlx-lm's loader drops it before loading another), it could not come back.
        for weights in served.glob("*.safetensors"):
            weights.unlink()
        status, body = post(port, "/v1/completions", {**ask, "model": str(DEFAULT_MODEL)})
        assert status == 400, body
        assert "--kv-bits cannot be used" in body["error"] and "head_dim 48" in body["error"]
        status, body = post(port, "/v1/completions", ask)
        assert status == 200 and body["choices"][0]["text"] == first["choices"][0]["text"], body


def test_help_is_shown_with_a_kv_bits_the_model_cannot_take():
    """--help stops the command before anything loads: it prints the help, not the refusal."""
    done = subprocess.run([sys.executable, "-m", "mlx_falcon_h1.generate", "--kv-bits", "8", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout and "error:" not in done.stderr
