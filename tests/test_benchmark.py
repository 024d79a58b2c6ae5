"""Smoke run of the benchmark on a tiny random model (the real numbers live in the README),
and the Linux BLAS and malloc settings."""

import json
import os
import subprocess
import sys

import pytest


def test_benchmark_smoke(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "mlx_falcon_h1.benchmark", "--shape", "tiny", "-p", "16", "40"]
    cmd += ["-g", "4", "--cache-dir", str(tmp_path / "models"), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "| prompt |" in done.stdout and "decode bound" in done.stdout
    result = json.loads(out.read_text())
    assert [r["prompt_tokens"] for r in result["rows"]] == [16, 40]
    for row in result["rows"]:
        for name in ("ours", "mlx-lm"):
            assert row[f"{name}_prompt_tps"] > 0 and row[f"{name}_generation_tps"] > 0
    assert result["blas"] and result["malloc"] and result["mlx"] and result["dtype"] == "float32"
    launches = result["decode_launches_per_layer"]
    assert 0 < launches["ours"] < launches["mlx-lm"] and "launches per layer" in done.stdout
    per_token = result["decode_launches_per_token"]
    assert 0 < per_token["ours"] < per_token["mlx-lm"] and "per token ours" in done.stdout
    assert result["compiled_decode"] and result["compiled_decode_traces"] >= 1


def test_benchmark_long_prompts_smoke(tmp_path):
    """--long: prefill only (no decode columns, nothing decode-related measured),
    --layers recorded; the lengths shrunk here, the real ones are 16K-64K."""
    out = tmp_path / "long.json"
    cmd = [sys.executable, "-m", "mlx_falcon_h1.benchmark", "--shape", "tiny", "--long", "-p", "64", "200",
           "--layers", "1", "--prefill-step-size", "64", "--cache-dir", str(tmp_path / "models"),
           "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "(1 layers)" in done.stdout and "prefill step 64" in done.stdout
    assert "decode" not in done.stdout
    result = json.loads(out.read_text())
    assert result["layers"] == 1 and result["generation_tokens"] == 0 and result["prefill_step_size"] == 64
    assert [r["prompt_tokens"] for r in result["rows"]] == [64, 200]
    for row in result["rows"]:
        for name in ("ours", "mlx-lm"):
            assert row[f"{name}_prompt_tps"] > 0 and row[f"{name}_transient_peak_gb"] > 0
            assert f"{name}_generation_tps" not in row
    assert result["decode_launches_per_layer"] is None


def test_blas_opt_out(tmp_path):
    code = "import mlx_falcon_h1.blas as b, mlx_falcon_h1; print(b.in_use)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"MLX_FALCON_H1_BLAS": "0", "PATH": ""})  # fmt: skip
    assert done.stdout.strip() == "bundled"


def test_malloc_setting_and_its_opt_out():
    code = "import mlx_falcon_h1.allocator as a, mlx_falcon_h1; print(a.in_use)"
    runs = {}
    for value in ("0", ""):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={"MLX_FALCON_H1_MALLOC": value, "PATH": ""})  # fmt: skip
        runs[value] = done.stdout.strip()
    assert runs["0"] == "glibc defaults"
    if sys.platform.startswith("linux"):
        assert runs[""].startswith("kept") or "no mallopt" in runs[""]


def run_python(code, **env):
    full = {**os.environ, **env}
    full.pop("MLX_FALCON_H1_BLAS", None) if "MLX_FALCON_H1_BLAS" not in env else None
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full)


CHECK_MATMUL = (
    "import numpy as np, mlx.core as mx; a = np.random.default_rng(0).normal(size=(64, 80))"
    ".astype(np.float32); b = a[:48].T.copy(); "
    "assert np.allclose(np.array(mx.array(a) @ mx.array(b)), a @ b, rtol=1e-4, atol=1e-4)"
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_pip_openblas_through_the_shim():
    """scipy-openblas32 (a dependency on Linux) serves MLX's matmuls, right."""
    code = "import mlx_falcon_h1.blas as b, mlx_falcon_h1; print(b.in_use); " + CHECK_MATMUL
    done = run_python(code, MLX_FALCON_H1_BLAS="scipy-openblas32")
    assert done.returncode == 0, done.stderr
    assert "libcblas_scipy_openblas" in done.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_import_order_is_detected():
    """mlx.core first: the bundled BLAS is named, with the fix, once."""
    code = "import mlx.core, mlx_falcon_h1.blas as b; print(b.in_use)"
    done = run_python(code)
    assert "bundled (mlx.core was imported before mlx_falcon_h1)" in done.stdout
    assert done.stderr.count("Import mlx_falcon_h1 first") == 1
    # With the library preloaded, the order does not matter and nothing is said.
    shim = run_python("import mlx_falcon_h1.blas as b, mlx_falcon_h1; print(b.in_use)",
                      MLX_FALCON_H1_BLAS="scipy-openblas32").stdout.strip()  # fmt: skip
    done = run_python(code + "; " + CHECK_MATMUL, LD_PRELOAD=shim)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == shim and "Import mlx_falcon_h1 first" not in done.stderr


def test_mac_prediction_cli(tmp_path):
    """--mac-prediction SHAPE...: launch counts and the Mac speed model's PREDICTED
    tok/s for those shapes, Tiny-90M (the calibration's model) always among them."""
    out = tmp_path / "mac.json"
    cmd = [sys.executable, "-m", "mlx_falcon_h1.benchmark", "--mac-prediction", "tiny",
           "--cache-dir", str(tmp_path / "models"), "--json", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "PREDICTED" in done.stdout and "| tiny | 4-bit |" in done.stdout
    result = json.loads(out.read_text())
    assert [(r["shape"], r["weights"]) for r in result["rows"]] == [
        ("Tiny-90M", "bf16"), ("Tiny-90M", "4-bit"), ("tiny", "bf16"), ("tiny", "4-bit")]
    for row in result["rows"]:
        assert 0 < row["ours_per_layer"] <= row["mlx-lm_per_layer"]
        assert row["ours_per_token"] == row["ours_fixed"] + row["layers"] * row["ours_per_layer"]
    assert [c["chip"] for c in result["calibration"]] == ["M1 Ultra", "M5 Max"]
