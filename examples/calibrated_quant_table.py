"""The README's calibrated-quantization table: each method against plain quantization.

For each bit width (4-bit g64, 3-bit g32) converts the transformers checkpoint
(default: the shipped model's fixture) plainly and with each calibrated method
(--method gptq, awq, dwq, dynamic), each conversion in its own process so its
peak memory is its own, calibrated on the shipped calibration text (not the
evaluation text). Then measures, on the held-out text, perplexity, mean KL and
top-1 agreement against our float32 model, as examples/quality_table.py does,
with the safetensors size, the calibration time and the peak memory.

    python examples/calibrated_quant_table.py --max-tokens 4096 --json examples/calibrated_quant_table_tiny.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_falcon_h1  # noqa: F401  (picks the BLAS before mlx.core is imported)
from mlx_falcon_h1.evaluate import compare, default_text_path, load_tokens
from mlx_falcon_h1.loading import load, load_model
from mlx_falcon_h1_convert import convert

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny_falcon_h1_hf"
SETTINGS = {"4-bit g64": (4, 64), "3-bit g32": (3, 32)}
# row name: converter flags ("plain": no --method)
METHODS = {
    "plain": [],
    "gptq": ["--method", "gptq"],
    "awq": ["--method", "awq"],
    "dwq": ["--method", "dwq"],
    "gptq+dwq": ["--method", "dwq", "--dwq-init", "gptq"],
    "dynamic": ["--method", "dynamic"],
}


def run_conversion(hf: Path, out: Path, bits: int, group_size: int, method: str, extra) -> float:
    """One conversion in a fresh process; returns its wall time in seconds."""
    cmd = [sys.executable, "-m", "mlx_falcon_h1_convert", "--hf-path", str(hf), "--mlx-path", str(out),
           "-q", "--q-bits", str(bits), "--q-group-size", str(group_size), "--dtype", "bfloat16"]  # fmt: skip
    if method != "plain":
        cmd += [*METHODS[method], *extra]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", default=str(FIXTURE))
    p.add_argument("--text", default=None, help="evaluation text (default: the shipped held-out set)")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--json", default=None)
    p.add_argument("extra", nargs=argparse.REMAINDER,
                   help="after --: flags passed to every calibrated conversion (e.g. -- --num-samples 32)")  # fmt: skip
    a = p.parse_args()
    extra = [x for x in a.extra if x != "--"]

    hf = Path(a.hf_path)
    text = Path(a.text).read_text() if a.text else default_text_path().read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        convert(str(hf), str(tmp / "f32"), dtype="float32")
        reference, tokenizer = load(str(tmp / "f32"))
        tokens = load_tokens(tokenizer, text, a.max_tokens)
        for setting in a.settings:
            bits, group_size = SETTINGS[setting]
            for method in a.methods:
                out = tmp / f"{setting}-{method}".replace(" ", "_")
                seconds = run_conversion(hf, out, bits, group_size, method, extra)
                report = json.loads((out / "quality_report.json").read_text())
                cal = report.get("calibration", {})
                stats = compare(load_model(out)[0], reference, tokens, seq_len=a.seq_len)
                size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
                row = {
                    "setting": setting, "method": method, "perplexity": stats["perplexity"],
                    "kl": stats["kl"], "top1_agreement": stats["top1_agreement"], "size_mb": size,
                    "calibration_seconds": cal.get("calibration_seconds"),
                    "calibration_peak_memory_gb": cal.get("calibration_peak_memory_gb"),
                    "process_peak_rss_gb": cal.get("process_peak_rss_gb"),
                    "conversion_seconds": seconds, "calibration": cal,
                }  # fmt: skip
                rows.append(row)
                print(f"{setting:10s} {method:8s} ppl {row['perplexity']:8.3f}  KL {row['kl']:.5f}  "
                      f"top-1 {row['top1_agreement']:.4f}  {size:.3f} MB  "
                      f"calib {cal.get('calibration_seconds', 0):6.1f} s  "
                      f"peak {cal.get('calibration_peak_memory_gb', 0):.3f} GB MLX / "
                      f"{cal.get('process_peak_rss_gb', 0):.3f} GB RSS", flush=True)  # fmt: skip

    print("\n| setting | method | perplexity | KL vs ours f32 | top-1 agreement | size MB | calibration s | peak memory GB (MLX / process) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        cal = "" if r["calibration_seconds"] is None else f"{r['calibration_seconds']:.0f}"
        mem = "" if r["calibration_peak_memory_gb"] is None else \
            f"{r['calibration_peak_memory_gb']:.2f} / {r['process_peak_rss_gb']:.2f}"  # fmt: skip
        print(f"| {r['setting']} | {r['method']} | {r['perplexity']:.2f} | {r['kl']:.5f} | "
              f"{r['top1_agreement']:.4f} | {r['size_mb']:.2f} | {cal} | {mem} |")  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "tokens": int(len(tokens) - 1), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
