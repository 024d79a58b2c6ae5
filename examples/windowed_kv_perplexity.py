"""What --max-kv-size costs: perplexity of a model with a bounded attention K/V.

A bounded K/V (mlx-lm's RotatingKVCache: the first 4 tokens and the latest
ones) is an approximation: attention stops seeing the tokens in between, while
the Mamba state still carries them. This reads one long held-out text as one
sequence through the cache, as a chat or a long generation would, and prints
the perplexity at each window against the whole cache:
- decode: one token at a time, what generated tokens see;
- prefill: in steps of --prefill-step-size, what a long prompt sees (inside a
  step mlx-lm's mask is a plain sliding window of max_kv_size keys).

    python examples/windowed_kv_perplexity.py --json examples/windowed_kv_perplexity.json
"""

import argparse
import json
import math
import time

import mlx_falcon_h1  # noqa: F401  (picks the BLAS before mlx.core is imported)
import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mlx_falcon_h1.commands import DEFAULT_MODEL
from mlx_falcon_h1.evaluate import default_text_path, load_tokens
from mlx_falcon_h1.loading import load


def sequence_nll(model, tokens: np.ndarray, max_kv_size, step: int, desc: str) -> np.ndarray:
    """Negative log-likelihood of tokens[1:], reading tokens through one cache in
    calls of `step` tokens."""
    cache = model.make_cache(max_kv_size=max_kv_size)
    nll = []
    with tqdm(total=len(tokens) - 1, desc=desc, unit="tok", leave=False) as bar:
        for start in range(0, len(tokens) - 1, step):
            chunk = tokens[start : min(start + step, len(tokens) - 1)]
            target = mx.array(tokens[start + 1 : start + 1 + len(chunk)])
            logits = model(mx.array(chunk)[None], cache=cache)[0].astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            out = -mx.take_along_axis(logp, target[:, None], axis=-1)[:, 0]
            mx.eval(out, [c.state for c in cache])
            nll.append(np.array(out, dtype=np.float64))
            bar.update(len(chunk))
    return np.concatenate(nll)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--tokens", type=int, default=4096, help="length of the held-out sequence")
    p.add_argument("--windows", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024])
    p.add_argument("--prefill-step-size", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, tokenizer = load(args.model)
    tokens = load_tokens(tokenizer, default_text_path().read_text(), args.tokens)
    rows = []
    for mode, step in (("decode", 1), ("prefill", args.prefill_step_size)):
        whole = None
        for window in [None] + args.windows:
            t0 = time.perf_counter()
            nll = sequence_nll(model, tokens, window, step, f"{mode} {window or 'whole'}")
            if whole is None:
                whole = nll
            row = dict(
                mode=mode, max_kv_size=window, tokens=len(nll), perplexity=math.exp(nll.mean()),
                # Only tokens past the window can differ from the whole cache.
                delta_loss=float(nll.mean() - whole.mean()),
                affected_delta_loss=float((nll - whole)[window:].mean()) if window else 0.0,
                seconds=round(time.perf_counter() - t0, 1),
            )
            rows.append(row)
            print(f"{mode:8s} {str(window or 'whole'):>6s}  ppl {row['perplexity']:8.4f}  "
                  f"+{100 * (math.exp(row['delta_loss']) - 1):6.2f}%  "
                  f"(past the window: {row['affected_delta_loss']:+.4f} nats/token)", flush=True)
    result = dict(model=args.model, text=str(default_text_path().name), tokens=len(tokens),
                  prefill_step_size=args.prefill_step_size,
                  max_position_embeddings=model.args.max_position_embeddings, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
