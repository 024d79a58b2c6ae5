"""What a prompt-cache entry spilled to disk costs and saves: writing it, reading it
back, against reading its tokens again.

    python examples/prompt_cache_spill_cost.py [-n 4096] [--trials 3] [--json OUT]

For the shipped model and a random model of the 0.5B shape with 4 layers (float32,
mlx_falcon_h1.benchmark's helper): reads a prompt of -n random tokens cold as
mlx-lm's generate_step does (chunks of 2048, the caches evaluated after each, then
the last token's logits), stores it in a PromptCache with a spill folder
(checkpoints every 2048 tokens and before the last token, as the server keeps
them), and times
- write: evicting it to the folder (PromptCache.trim_to(0): serialise, fsync, rename);
- open: a new PromptCache on the folder (reads each file's header);
- read: the fetch that brings it back (read, checked against the model, copied),
  once with the file dropped from the OS page cache (posix_fadvise DONTNEED,
  where the OS has it: a read from the disk) and once from the page cache.
Per layer: the K/V of a token and a checkpoint (conv + SSM state), so that the
file of a full-depth model follows by arithmetic (the file is the layers' K/V,
their states and checkpoints; the rollback window adds 32-64 rows a layer).
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import mlx_falcon_h1  # noqa: F401  (first: picks the BLAS before mlx.core loads, blas.py)
import mlx.core as mx
import numpy as np

from mlx_falcon_h1.benchmark import make_random_model
from mlx_falcon_h1.cache import FalconH1Cache
from mlx_falcon_h1.commands import DEFAULT_MODEL
from mlx_falcon_h1.loading import load_model
from mlx_falcon_h1.prompt_cache import PromptCache

PREFILL_STEP = 2048  # mlx-lm's prefill_step_size


def cold_read(model, prompt):
    """Seconds to read the prompt from nothing, and the caches after it."""
    cache = model.make_cache()
    tic = time.perf_counter()
    for i in range(0, len(prompt) - 1, PREFILL_STEP):
        model(mx.array([prompt[i:min(i + PREFILL_STEP, len(prompt) - 1)]]), cache=cache)
        mx.eval([c.state for c in cache])
    mx.eval(model(mx.array([prompt[-1:]]), cache=cache))
    return time.perf_counter() - tic


def drop_from_page_cache(folder: Path) -> bool:
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in folder.glob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def measure(name, model, n, trials, rng):
    prompt = [int(t) for t in rng.randint(4, model.args.vocab_size, n)]
    rereads = [cold_read(model, prompt) for _ in range(max(1, trials - 1))]
    reread = float(np.median(rereads))
    rows = []
    for _ in range(trials):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            store = PromptCache(model.make_cache, spill_dir=folder)
            cache, rest = store.fetch(prompt)
            for i in range(0, len(rest), PREFILL_STEP):
                model(mx.array([rest[i:i + PREFILL_STEP]]), cache=cache)
                mx.eval([c.state for c in cache])
            store.insert(prompt, cache)
            checkpoints = store.checkpoint_count
            tic = time.perf_counter()
            store.trim_to(0)
            write = time.perf_counter() - tic
            file_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
            row = {"write_s": write, "file_bytes": file_bytes, "checkpoints": checkpoints}
            for how in ("disk", "page_cache"):
                if how == "disk" and not drop_from_page_cache(folder):
                    continue
                tic = time.perf_counter()
                later = PromptCache(model.make_cache, spill_dir=folder)
                opened = time.perf_counter()
                back, rest = later.fetch(prompt + [prompt[0]])
                mx.eval([c.state for c in back])
                row["open_s"] = opened - tic
                row[f"read_{how}_s"] = time.perf_counter() - opened
                assert len(rest) == 1, len(rest)
            rows.append(row)
    one = model.make_cache()
    model(mx.array([prompt[:64]]), cache=one)
    mx.eval([c.state for c in one])
    c = one[0]
    assert isinstance(c, FalconH1Cache)
    kv_token = (c.kv.keys.nbytes + c.kv.values.nbytes) // c.kv.keys.shape[2]
    timed = {k: [r[k] for r in rows if k in r] for k in rows[0] if k.endswith("_s")}
    best = {k: float(np.median(v)) for k, v in timed.items()}  # run to run: the runs' min and max
    file_bytes = rows[0]["file_bytes"]
    return {
        "model": name,
        "layers": len(model.layers),
        "prompt_tokens": n,
        "checkpoints": rows[0]["checkpoints"],
        "file_mib": file_bytes / 2**20,
        "per_layer": {
            "kv_bytes_per_token": kv_token,
            "checkpoint_bytes": c.conv_state.nbytes + c.ssm_state.nbytes,
            "conv_dtype": str(c.conv_state.dtype),
        },
        "reread_s": reread,
        "reread_runs_s": rereads,
        "reread_tokens_per_s": n / reread,
        **best,
        "write_mb_per_s": file_bytes / 1e6 / best["write_s"],
        "read_disk_mb_per_s": file_bytes / 1e6 / best["read_disk_s"] if "read_disk_s" in best else None,
        "ranges_s": {k: [min(v), max(v)] for k, v in timed.items()},
        "runs": rows,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", "--prompt-tokens", type=int, default=4096)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--json", type=Path,
                   default=Path(__file__).parent / "benchmarks" / "prompt_cache_spill_cpu.json")
    args = p.parse_args(argv)
    rng = np.random.RandomState(0)
    load_before = os.getloadavg()
    results = []
    results.append(measure("shipped (8-bit, 4 layers)", load_model(DEFAULT_MODEL)[0],
                           min(args.prompt_tokens, 4095), args.trials, rng))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_random_model("0.5B", Path(tmp), "float32", layers=4)
        results.append(measure("0.5B shape, 4 layers, float32", load_model(folder)[0],
                               args.prompt_tokens, args.trials, rng))
    report = {
        "mlx": mx.__version__,
        "device": f"{mx.default_device()} ({platform.machine()}, {platform.system()}, "
                  f"{os.cpu_count()} CPUs)",
        "loadavg_before_after": [load_before, os.getloadavg()],
        "results": results,
    }
    def ms(r, key):
        low, high = r["ranges_s"][key]
        return f"{r[key] * 1e3:.0f} ms ({low * 1e3:.0f}-{high * 1e3:.0f})"

    for r in results:
        print(f"{r['model']}: {r['prompt_tokens']} tokens, file {r['file_mib']:.1f} MiB "
              f"({r['checkpoints']} checkpoints); re-read {r['reread_s']:.2f} s; median (min-max): "
              f"write {ms(r, 'write_s')}, open {ms(r, 'open_s')}, read "
              f"{ms(r, 'read_disk_s') if 'read_disk_s' in r else '-'} from disk, "
              f"{ms(r, 'read_page_cache_s')} page-cached; per layer: K/V "
              f"{r['per_layer']['kv_bytes_per_token']} B/token, checkpoint "
              f"{r['per_layer']['checkpoint_bytes'] / 2**20:.2f} MiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
