"""Every command as a new user first runs it: its defaults, on the model shipped with
the package (mlx_falcon_h1/default_model, 4 layers, 8-bit), from a folder that is not
the repository's. Each works or refuses in one line; none ends in a traceback.

Run elsewhere, because their default runs take minutes or tens of seconds here:
- evaluate (32K tokens, ~40 s): test_cli_errors.test_evaluate_defaults_to_the_shipped_model
  runs it without --model on 200 tokens;
- selfcheck (~35 s: g++ compiles every kernel's Metal source for the emulator):
  test_kernels_selfcheck runs its main([]) at smaller sizes;
- benchmark (builds a random 0.5B model and times 512- to 8192-token prompts, both
  implementations): test_benchmark.test_benchmark_smoke runs that path at --shape tiny.
"""

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mlx_falcon_h1.commands import DEFAULT_MODEL

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_falcon_h1_hf"  # what the converter takes: unquantized


def run(tmp_path, *args, stdin=None):
    done = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, input=stdin,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done


def works(done):
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def refused_in_one_line(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode != 0 and len(lines) == 1, done.stderr[-3000:]
    return lines[0]


def test_generate(tmp_path):
    assert "Generation: 100 tokens" in works(run(tmp_path, "mlx_falcon_h1.generate"))


@pytest.mark.parametrize("typed", ["def add(a, b):\nq\n", ""], ids=["q", "end-of-input"])
def test_chat(tmp_path, typed):
    """Quit with `q`, or with Ctrl-D (the end of input), after a turn or before one."""
    assert "bye" in works(run(tmp_path, "mlx_falcon_h1.chat", stdin=typed))


def test_memory(tmp_path):
    assert "Falcon-H1 0.5B" in works(run(tmp_path, "mlx_falcon_h1.memory"))


def test_server(tmp_path):
    """Started with no flags but a free port, one completion, stopped."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "mlx_falcon_h1.server", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        body = json.dumps({"prompt": "def add(a, b):", "max_tokens": 8}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                         {"Content-Type": "application/json"})  # fmt: skip
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    answer = json.loads(response.read())
                break
            except urllib.error.URLError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.3)
        assert answer["choices"][0]["text"]
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0]
    assert "Traceback" not in output, output[-3000:]


def test_lora_then_fuse(tmp_path):
    """A new user's first fine-tune: --model (lora has no default model: mlx-lm's
    default is a Qwen, refused), --train, --data with a train.jsonl of 32 rows and no
    valid.jsonl; --iters 2 instead of 1000. mlx-lm's default --num-layers 16 is more
    than the shipped model's 4: all are trained. Then fuse with no flags at all."""
    nothing_to_do = run(tmp_path, "mlx_falcon_h1.lora", "--model", str(DEFAULT_MODEL))
    assert "add --train (fine-tune), --test (evaluate)" in refused_in_one_line(nothing_to_do)

    data = tmp_path / "data"
    data.mkdir()
    rows = [{"text": f"def add_{i}(x):\n    return x + {i}\n"} for i in range(32)]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    out = works(run(tmp_path, "mlx_falcon_h1.lora", "--model", str(DEFAULT_MODEL), "--train",
                    "--data", "data", "--iters", "2"))  # fmt: skip
    assert "the model has 4 layers: training all 4 (--num-layers 16)" in out
    assert json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())["num_layers"] == 4

    works(run(tmp_path, "mlx_falcon_h1.fuse"))  # --model: the shipped one; adapters/ -> fused_model/
    from mlx_falcon_h1 import load

    model, _ = load(str(tmp_path / "fused_model"))
    assert len(model.layers) == 4


def test_convert(tmp_path):
    """The fixture (the shipped model's unquantized source) to mlx_model/; --upgrade on
    that; the shipped model itself, already quantized, and a quantization MLX cannot
    store, each refused in one line with nothing written."""
    works(run(tmp_path, "mlx_falcon_h1_convert", "--hf-path", str(FIXTURE)))
    assert (tmp_path / "mlx_model" / "config.json").exists()
    assert "nothing to do" in works(run(tmp_path, "mlx_falcon_h1_convert", "--upgrade", "mlx_model"))

    refused = run(tmp_path, "mlx_falcon_h1_convert", "--hf-path", str(DEFAULT_MODEL), "--mlx-path", "a")
    assert "already quantized; use --dequantize first" in refused_in_one_line(refused)
    refused = run(tmp_path, "mlx_falcon_h1_convert", "--hf-path", str(FIXTURE), "--mlx-path", "b",
                  "-q", "--q-mode", "mxfp4", "--q-bits", "3")  # fmt: skip
    assert "--q-mode mxfp4 takes --q-bits 4 and --q-group-size 32" in refused_in_one_line(refused)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
