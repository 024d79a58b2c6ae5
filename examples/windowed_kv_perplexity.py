"""What --max-kv-size costs: perplexity of a model with a bounded attention K/V.

A bounded K/V (mlx-lm's RotatingKVCache: the first 4 tokens and the latest
ones) is an approximation: attention stops seeing the tokens in between, while
the Mamba state still carries them. This reads held-out sequences through the
cache, as a chat or a long generation would, and prints the perplexity at each
window against the whole cache:
- decode: one token at a time, what generated tokens see;
- prefill: in steps of --prefill-step-size, what a long prompt sees (inside a
  step mlx-lm's mask is a plain sliding window of max_kv_size keys).
Sequences are --seq-len tokens (default: the shipped model's training length,
256: past it a model's attention is out of its depth and a window can even
help), read as one batch.

    python examples/windowed_kv_perplexity.py --json examples/windowed_kv_perplexity.json
    python examples/windowed_kv_perplexity.py --seq-len 4096 --sequences 4 --windows 64 256 1024
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
    """Negative log-likelihood (B, T - 1) of tokens[:, 1:], reading the sequences
    tokens (B, T) through one cache in calls of `step` tokens."""
    cache = model.make_cache(max_kv_size=max_kv_size)
    length = tokens.shape[1] - 1
    nll = []
    with tqdm(total=length, desc=desc, unit="tok", leave=False) as bar:
        for start in range(0, length, step):
            end = min(start + step, length)
            target = mx.array(tokens[:, start + 1 : end + 1])
            logits = model(mx.array(tokens[:, start:end]), cache=cache).astype(mx.float32)
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            out = -mx.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
            mx.eval(out, [c.state for c in cache])
            nll.append(np.array(out, dtype=np.float64))
            bar.update(end - start)
    return np.concatenate(nll, axis=1)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--seq-len", type=int, default=256, help="tokens per held-out sequence")
    p.add_argument("--sequences", type=int, default=64, help="how many (consecutive in the text)")
    p.add_argument("--windows", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--prefill-step-size", type=int, default=64)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    model, tokenizer = load(args.model)
    text = load_tokens(tokenizer, default_text_path().read_text())
    if len(text) < args.sequences * args.seq_len + 1:
        raise SystemExit(f"the held-out text has {len(text)} tokens: fewer than --sequences x --seq-len")
    tokens = np.stack([text[i * args.seq_len : (i + 1) * args.seq_len + 1] for i in range(args.sequences)])
    rows = []
    for mode, step in (("decode", 1), ("prefill", args.prefill_step_size)):
        whole = None
        for window in [None] + args.windows:
            t0 = time.perf_counter()
            nll = sequence_nll(model, tokens, window, step, f"{mode} {window or 'whole'}")
            if whole is None:
                whole = nll
            row = dict(
                mode=mode, max_kv_size=window, tokens=int(nll.size), perplexity=math.exp(nll.mean()),
                delta_loss=float(nll.mean() - whole.mean()),
                # Only tokens past the window can differ from the whole cache.
                affected_delta_loss=float((nll - whole)[:, window:].mean()) if window else 0.0,
                seconds=round(time.perf_counter() - t0, 1),
            )
            rows.append(row)
            print(f"{mode:8s} {str(window or 'whole'):>6s}  ppl {row['perplexity']:8.4f}  "
                  f"+{100 * (math.exp(row['delta_loss']) - 1):6.2f}%  "
                  f"(past the window: {row['affected_delta_loss']:+.4f} nats/token)", flush=True)
    result = dict(model=args.model, text=str(default_text_path().name), seq_len=args.seq_len,
                  sequences=args.sequences, prefill_step_size=args.prefill_step_size,
                  max_position_embeddings=model.args.max_position_embeddings, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
