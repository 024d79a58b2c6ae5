"""Regenerate tests/fixtures/published/manifest.json from the real mlx-lm releases.

Run by hand, never in CI (it installs three historical mlx-lm releases from the
package registry, ~1 min each on a fast link):

    python tests/helpers/make_published_fixtures.py [--venvs DIR]

For every case of tests/published.py (the trained fixture in bf16, 4-bit and
8-bit; the random checkpoints in bf16 and 4-bit) it converts the Hugging Face
folder with `mlx_lm.convert` of each release that can (0.28.1 with mlx 0.29,
0.30.4, 0.32.2; 0.28.1 cannot convert a tied checkpoint) and records what the
converter set and removed in config.json (published.config_changes) and every
tensor's hash. The tests rebuild each folder with the installed
mlx-lm and check it against every release recorded here, so the committed
fixture is a few hundred kB rather than the folders themselves.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

import mlx_falcon_h1  # noqa: E402,F401  (first: picks MLX's BLAS on Linux)
import published as P  # noqa: E402

# release -> the mlx it was released against
MLX_OF = {"0.28.1": "0.29.*", "0.30.4": "0.30.*", "0.32.2": "0.32.*"}


def venv_python(venvs: Path, release: str) -> Path:
    python = venvs / f"mlx-lm-{release}" / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(python.parents[1])], check=True)
        mlx = "mlx[cpu]" if platform.system() == "Linux" else "mlx"
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"mlx-lm=={release}", f"{mlx}=={MLX_OF[release]}"],
            check=True,
        )
    return python


def cases(work: Path):
    """(name, Hugging Face folder, bits, releases) for every recorded case."""
    for bits in (None, 4, 8):
        yield f"trained-{bits or 'bf16'}", P.FIXTURE, bits, P.RELEASES
    for name, overrides in P.RANDOM_CASES.items():
        source = P.bf16_checkpoint(work / f"hf-{name}", **overrides)
        releases = P.TIED_RELEASES if overrides.get("tie_word_embeddings") else P.RELEASES
        for bits in (None, 4):
            yield f"{name}-{bits or 'bf16'}", source, bits, releases


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--venvs", type=Path, default=Path.home() / ".cache" / "mlx-falcon-h1-published")
    args = p.parse_args()
    manifest = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, source, bits, releases in cases(work):
            entry = {"bits": bits, "releases": {}, "tensors": {}}
            for release in releases:
                out = work / f"{name}-{release}"
                cmd = [str(venv_python(args.venvs, release)), "-m", "mlx_lm", "convert",
                       "--hf-path", str(source), "--mlx-path", str(out)]  # fmt: skip
                if bits:
                    cmd += ["-q", "--q-bits", str(bits), "--q-group-size", "64"]
                subprocess.run(cmd, check=True, capture_output=True)
                hashes = P.tensor_hashes(out)
                digest = P.digest(hashes)
                entry["tensors"].setdefault(digest, hashes)
                written, read = (json.loads((f / "config.json").read_text()) for f in (out, source))
                entry["releases"][release] = {"tensors": digest, "config_changes": P.config_changes(read, written)}
                print(f"{name} {release}: {digest}")
            manifest[name] = entry
    P.MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    P.MANIFEST.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {P.MANIFEST}")


if __name__ == "__main__":
    main()
