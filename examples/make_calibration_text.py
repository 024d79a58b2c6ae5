"""Write mlx_falcon_h1/data/calibration.txt, the offline default calibration text.

The calibrated quantization methods (mlx_falcon_h1/quantize/) need text the
model is meant to run on that is not the evaluation text. For the shipped model
that is Python source from its training split: CPython 3.11's standard library
.py files, sorted by path, tests excluded, exactly as
examples/train_tiny_falcon_h1.py lists them; the held-out files there are
indices 10, 30, 50, ... (every 20th, offset 10). This takes indices 5, 25, 45,
... (every 20th, offset 5: training files, spread over the whole library),
whole files in order until --bytes (the last cut at a line end).

    python examples/make_calibration_text.py    # with CPython 3.11's stdlib
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from train_tiny_falcon_h1 import split_files, stdlib_files  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "mlx_falcon_h1" / "data" / "calibration.txt")
    p.add_argument("--bytes", type=int, default=160_000)
    p.add_argument("--every", type=int, default=20)
    p.add_argument("--offset", type=int, default=5)
    a = p.parse_args()

    _, files = stdlib_files()
    train, heldout = split_files(files, a.every)
    held = {name for name, _ in heldout}
    chosen = [(n, t) for i, (n, t) in enumerate(files) if i % a.every == a.offset]
    assert not held.intersection(n for n, _ in chosen), "calibration files must be training files"
    parts, size = [], 0
    for name, text in chosen:
        text = text if text.endswith("\n") else text + "\n"
        room = a.bytes - size
        if len(text.encode()) > room:
            cut = text.encode()[:room].decode("utf-8", "ignore")
            parts.append(cut[: cut.rfind("\n") + 1])
            print(f"{name} (part)")
            break
        parts.append(text)
        size += len(text.encode()) + 1
        print(name)
    a.out.write_text("\n".join(parts), encoding="utf-8")
    print(f"wrote {a.out}: {a.out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
