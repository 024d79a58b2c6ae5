"""The quality report of a quantized conversion: quantized vs float on fixed tokens."""

from pathlib import Path

import mlx.core as mx
import numpy as np

from mlx_falcon_h1.evaluate import cast_model, compare
from mlx_falcon_h1.loading import load_model

# Fixed text, so reports of different conversions are comparable. Tokenized with
# the checkpoint's tokenizer when it has one; otherwise fixed pseudo-random ids.
REPORT_TEXT = '''def fibonacci(n):
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        if not self.items:
            raise IndexError("pop from an empty stack")
        return self.items.pop()

The quick brown fox jumps over the lazy dog. Falcon-H1 runs attention and a
Mamba2 state-space mixer side by side in every layer; quantization error in the
state-space parameters accumulates over the sequence, so long contexts show it.
'''


def report_tokens(folder: Path, count: int, vocab_size: int) -> np.ndarray:
    if any((folder / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        from mlx_lm.utils import load_tokenizer

        tokenizer = load_tokenizer(folder)
        ids = []
        while len(ids) < count:
            ids += tokenizer.encode(REPORT_TEXT)
        return np.array(ids[:count])
    return np.random.default_rng(0).integers(0, vocab_size, size=count)


def quality_report(float_folder: Path, quantized_folder: Path, count: int = 256) -> dict:
    """Mean KL(float || quantized) of the next-token distributions, top-1
    agreement and max |logit difference|, over `count` fixed tokens."""
    reference, config = load_model(float_folder)
    cast_model(reference, mx.float32)
    quantized, _ = load_model(quantized_folder)
    tokens = report_tokens(Path(float_folder), count + 1, config["vocab_size"])
    stats = compare(quantized, reference, tokens, seq_len=count, batch_size=1)
    return {
        "tokens": stats["tokens"],
        "mean_kl": stats["kl"],
        "top1_agreement": stats["top1_agreement"],
        "max_logit_diff": stats["max_logit_diff"],
    }
