"""Decode launches per token, ours and mlx-lm's, at every released Falcon-H1 shape and
Falcon-H1-Tiny-90M (bf16 and 4-bit), and the Mac speed model's PREDICTED tok/s,
calibrated on mlx-lm's published Tiny-90M figures first (docs/performance.md,
"Launches per token and a Mac speed model"). A prediction, not a measurement.

    python examples/mac_decode_prediction.py   # writes examples/mac_decode_prediction.json

Counts the model code as it is when run (fused projections or kernels added later
change the numbers); the 1- and 2-layer counting models are kept in --cache-dir.
Same as `python -m mlx_falcon_h1.benchmark --mac-prediction --json ...`.
"""

import sys
from pathlib import Path

from mlx_falcon_h1 import benchmark

if __name__ == "__main__":
    out = Path(__file__).with_suffix(".json")
    benchmark.main(["--mac-prediction", "--json", str(out), *sys.argv[1:]])
