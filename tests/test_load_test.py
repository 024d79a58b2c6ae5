"""examples/load_test.py, short: the server on the shipped model under concurrent good,
rude and bad clients. The script's own targets are the assertions (no 5xx, no crash,
every bad request refused, every greedy answer as alone, memory within the prompt
cache's bound); its figures are not timed here."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_short_load_test_meets_its_targets(tmp_path):
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "load_test.py"), "--duration", "12",
         "--clients", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert out.exists(), proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    failed = [name for name, ok in result["targets"].items() if not ok]
    assert proc.returncode == 0 and not failed, (failed, proc.stdout[-3000:])
    # The run exercised what it claims to: each kind of client got through.
    assert result["greedy_checked"] > 0 and result["refused_4xx"] > 0
    assert result["disconnects"] > 0 and result["served_2xx"] > result["greedy_checked"] / 2
