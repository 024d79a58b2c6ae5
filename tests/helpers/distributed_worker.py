"""One rank of tests/test_distributed.py: run checkpoints split across processes.

    mlx.launch -n 2 --backend ring -- python distributed_worker.py OUT CKPT [CKPT ...]
    python distributed_worker.py OUT CKPT [CKPT ...]        (one process: the baseline)

For each checkpoint folder (with a tokenizer) and each split (tensor, pipeline:
mlx_falcon_h1.loading.sharded_load; one process loads it whole), writes
OUT/<checkpoint name>.<split>.rank<r>.npz with: the logits of a batch of two
prompts in one call; the logits of the same prompts fed to a cache in pieces
(prefill, then a multi-token call, then single tokens); and the greedy tokens of
mlx-lm's generate_step with a small prefill step (so the prompt is prefilled in
pieces that mlx-lm evaluates through the cache alone).
"""

import sys
from pathlib import Path

import mlx_falcon_h1  # noqa: F401  (first: it picks the BLAS before mlx.core loads)
import mlx.core as mx
import numpy as np
from mlx_lm.generate import generate_step, generation_stream

from mlx_falcon_h1 import load
from mlx_falcon_h1.loading import sharded_load

LENGTH = 40  # spans three 16-token chunks
PIECES = (21, 5, 1, 1, 1)  # cached calls whose logits must equal one full call
NEW_TOKENS = 12


def run(model, vocab: int) -> dict:
    ids = np.random.default_rng(0).integers(0, vocab, size=(2, LENGTH))
    full = model(mx.array(ids))
    mx.eval(full)
    cache = model.make_cache()
    pieces, start = [], 0
    for n in PIECES:
        # Evaluated call by call, as mlx-lm does: the ranks of a pipeline hold
        # different graphs, so one lazy graph of several calls could order
        # their sends and gathers differently.
        pieces.append(model(mx.array(ids[:, start : start + n]), cache=cache))
        mx.eval(pieces[-1])
        start += n
    pieces = mx.concatenate(pieces, axis=1)
    tokens = [
        int(t)
        for t, _ in generate_step(
            mx.array(ids[0, :30]), model, max_tokens=NEW_TOKENS, prefill_step_size=8
        )
    ]
    # generate_step leaves one step in flight on its own stream; collectives of
    # two streams at once would pair up differently on the two ranks.
    mx.synchronize(generation_stream)
    return {
        "full": np.array(full),
        "pieces": np.array(pieces),
        "tokens": np.array(tokens),
        "cached_length": np.array(start),
    }


def main(out: str, checkpoints) -> None:
    group = mx.distributed.init()
    out = Path(out)
    for path in checkpoints:
        for split in ("tensor", "pipeline"):
            if group.size() == 1:
                model, _, config = load(path, return_config=True)  # unsplit
            else:
                groups = (None, group) if split == "tensor" else (group, None)
                model, _, config = sharded_load(path, *groups, return_config=True)
            result = run(model, config["vocab_size"])
            name = f"{Path(path).name}.{split}.rank{group.rank()}.npz"
            np.savez(out / name, **result)
    print(f"rank {group.rank()} of {group.size()}: done", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
