"""`python -m mlx_falcon_h1.evaluate`: perplexity, and agreement with a reference model.

    python -m mlx_falcon_h1.evaluate --model PATH [--text FILE] [--dtype float32]
    python -m mlx_falcon_h1.evaluate --model CONVERTED --reference HF_FOLDER \\
        --reference-backend torch --json report.json

Perplexity is exp(mean next-token negative log-likelihood) of the model under
test (this package's implementation) on a text: the tokenizer's encoding of the
whole text (BOS included when the tokenizer adds one), capped at --max-tokens,
cut into windows of --seq-len predictions that overlap by one token, so every
token after the first is predicted exactly once with at most --seq-len tokens
of context. Default text: the held-out set shipped with the package.

With --reference, both models see the same windows and the report adds, over
all predicted positions: the mean KL(reference || ours) of the next-token
distributions (nats), the top-1 agreement (fraction of positions whose argmax
tokens agree), the maximum |logit difference|, and the reference's own
perplexity. (KL is summed in float32, so two float32 runs of one model can give
a mean of order -1e-9.) The reference is another checkpoint run by this package
(--reference-backend mlx, the default) or a transformers checkpoint run by
transformers' FalconH1ForCausalLM in float32 (--reference-backend torch; needs
torch and transformers).

The functions (`load_tokens`, `windows`, `perplexity`, `compare`, `cast_model`,
`torch_reference`) are the API the converter's quality report uses.
"""

import argparse
import json
import math
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_map_with_path

from .parameter_dtypes import castable

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def default_text_path() -> Path:
    """The held-out text shipped with the package (Python stdlib files not trained on)."""
    return Path(str(resources.files("mlx_falcon_h1") / "data" / "heldout.txt"))


def load_tokens(tokenizer, text: str, max_tokens: Optional[int] = None) -> np.ndarray:
    """The tokenizer's encoding of `text` (with its special tokens, e.g. BOS),
    first `max_tokens` of it. Accepts a transformers tokenizer or mlx-lm's wrapper."""
    try:
        ids = tokenizer.encode(text, verbose=False)  # no "longer than the model" notice
    except TypeError:
        ids = tokenizer.encode(text)
    if max_tokens:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(f"the text gives {len(ids)} token(s); at least 2 are needed")
    return np.asarray(ids, dtype=np.int32)


def windows(tokens: Sequence[int], seq_len: int):
    """Windows of seq_len + 1 tokens, consecutive ones sharing one token: each
    token after the first is a target exactly once. The last may be shorter."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    out, i = [], 0
    while i + 1 < len(tokens):
        out.append(np.asarray(tokens[i : i + seq_len + 1]))
        i += seq_len
    return out


def _batches(tokens, seq_len, batch_size):
    """Lists of equal-length windows, at most batch_size each."""
    wins = windows(tokens, seq_len)
    full = [w for w in wins if len(w) == seq_len + 1]
    rest = [w for w in wins if len(w) != seq_len + 1]
    for i in range(0, len(full), batch_size):
        yield np.stack(full[i : i + batch_size])
    for w in rest:
        yield w[None]


def _progress(total, desc, enabled):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=not enabled, file=sys.stderr)


def _log_probs(logits) -> mx.array:
    logits = mx.array(logits).astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def perplexity(
    model: Callable,
    tokens: Sequence[int],
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> Dict[str, float]:
    """Perplexity of `model` (ids (B, L) -> logits (B, L, V)) on `tokens`.

    Returns {"loss": mean NLL in nats, "perplexity", "stderr" (of the
    perplexity, delta method), "tokens": number of predicted tokens}.
    """
    tokens = np.asarray(tokens)
    nlls = []
    with _progress(len(tokens) - 1, "Perplexity", progress) as bar:
        for batch in _batches(tokens, seq_len, batch_size):
            logp = _log_probs(model(mx.array(batch[:, :-1])))
            target = mx.array(batch[:, 1:])
            nll = -mx.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
            mx.eval(nll)
            nlls.append(np.asarray(nll, dtype=np.float64).ravel())
            bar.update(target.size)
    nll = np.concatenate(nlls)
    loss = float(nll.mean())
    ppl = math.exp(loss)
    stderr = ppl * float(nll.std(ddof=1)) / math.sqrt(len(nll)) if len(nll) > 1 else 0.0
    return {"loss": loss, "perplexity": ppl, "stderr": stderr, "tokens": int(len(nll))}


def compare(
    model: Callable,
    reference: Callable,
    tokens: Sequence[int],
    seq_len: int = 256,
    batch_size: int = 8,
    progress: bool = False,
) -> Dict[str, float]:
    """How closely `model` follows `reference` (both MLX ids (B, L) -> logits) on `tokens`.

    Returns, over all predicted positions: "kl" (mean KL(reference || model),
    nats), "kl_max", "top1_agreement", "max_logit_diff", plus "loss",
    "perplexity", "reference_loss", "reference_perplexity" on the same targets
    and "tokens". The reference may return MLX or NumPy logits (see torch_reference).
    """
    tokens = np.asarray(tokens)
    kl_sum = agree = count = 0
    kl_max = max_diff = 0.0
    nll = ref_nll = 0.0
    with _progress(len(tokens) - 1, "Compare", progress) as bar:
        for batch in _batches(tokens, seq_len, batch_size):
            ids = mx.array(batch[:, :-1])
            target = mx.array(batch[:, 1:])[..., None]
            ours = mx.array(model(ids)).astype(mx.float32)
            ref = mx.array(reference(ids)).astype(mx.float32)
            if ours.shape != ref.shape:
                raise ValueError(f"logit shapes differ: model {ours.shape}, reference {ref.shape}")
            logp, logq = _log_probs(ours), _log_probs(ref)
            kl = (mx.exp(logq) * (logq - logp)).sum(axis=-1)
            stats = [
                kl.sum(),
                kl.max(),
                (ours.argmax(-1) == ref.argmax(-1)).sum(),
                mx.abs(ours - ref).max(),
                -mx.take_along_axis(logp, target, axis=-1).sum(),
                -mx.take_along_axis(logq, target, axis=-1).sum(),
            ]
            mx.eval(stats)
            s = [float(x.item()) for x in stats]
            kl_sum += s[0]
            kl_max = max(kl_max, s[1])
            agree += int(s[2])
            max_diff = max(max_diff, s[3])
            nll += s[4]
            ref_nll += s[5]
            count += target.size
            bar.update(target.size)
    return {
        "kl": kl_sum / count,
        "kl_max": kl_max,
        "top1_agreement": agree / count,
        "max_logit_diff": max_diff,
        "loss": nll / count,
        "perplexity": math.exp(nll / count),
        "reference_loss": ref_nll / count,
        "reference_perplexity": math.exp(ref_nll / count),
        "tokens": count,
    }


def cast_model(model: nn.Module, dtype: Union[str, mx.Dtype]) -> nn.Module:
    """Cast floating-point parameters in place; returns the model.

    float32 casts all of them. bfloat16/float16 cast the `castable` ones (SSM
    parameters, conv and norms stay float32, as our loader holds them).
    Quantized weights (integers) are never touched.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype

    def cast(path, x):
        if not mx.issubdtype(x.dtype, mx.floating):
            return x
        if dtype == mx.float32 or castable(path):
            return x.astype(dtype)
        return x

    model.update(tree_map_with_path(cast, model.parameters()))
    mx.eval(model.parameters())
    return model


def torch_reference(path: Union[str, Path]) -> Callable[[np.ndarray], np.ndarray]:
    """transformers' FalconH1ForCausalLM from a checkpoint folder, in float32,
    as a function ids (B, L) -> NumPy logits."""
    import torch
    from transformers import FalconH1ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "fast path not available" notice is expected
    model = FalconH1ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.as_tensor(np.asarray(ids, dtype=np.int64))).logits.float().numpy()

    return run


def _model_fn(model):
    return lambda ids: model(mx.array(ids))


def main(argv=None):
    from .commands import DEFAULT_MODEL
    from .loading import load, load_model

    p = argparse.ArgumentParser(
        prog="python -m mlx_falcon_h1.evaluate",
        description="Perplexity of a Falcon-H1 checkpoint on a text, and its agreement "
        "with a reference checkpoint.",
    )
    p.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="checkpoint folder or Hub repo id (default: the model shipped with the package)")
    p.add_argument("--text", type=Path, default=None, help="text file (default: the shipped held-out set)")
    p.add_argument("--reference", default=None, help="checkpoint to compare against")
    p.add_argument(
        "--reference-backend",
        choices=["mlx", "torch"],
        default="mlx",
        help="run the reference with this package (mlx) or with transformers in float32 (torch)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast the model under test")
    p.add_argument(
        "--reference-dtype", choices=sorted(DTYPES), default="float32", help="cast an mlx reference"
    )
    p.add_argument("--max-tokens", type=int, default=32768, help="evaluate the first N tokens (0: all)")
    p.add_argument("--seq-len", type=int, default=256, help="predictions per window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    text_path = args.text or default_text_path()
    text = text_path.read_text(encoding="utf-8")
    model, tokenizer = load(args.model)
    if args.dtype:
        cast_model(model, args.dtype)
    tokens = load_tokens(tokenizer, text, args.max_tokens)
    progress = not args.quiet
    result = {
        "model": str(args.model),
        "dtype": args.dtype or "as stored",
        "text": str(text_path),
        "seq_len": args.seq_len,
        "max_tokens": args.max_tokens,
    }
    start = time.perf_counter()
    if args.reference is None:
        result.update(perplexity(_model_fn(model), tokens, args.seq_len, args.batch_size, progress))
    else:
        if args.reference_backend == "torch":
            reference = torch_reference(args.reference)
            result["reference_dtype"] = "float32 (transformers)"
        else:
            ref_model, _ = load_model(args.reference)
            cast_model(ref_model, args.reference_dtype)
            reference = _model_fn(ref_model)
            result["reference_dtype"] = args.reference_dtype
        result["reference"] = str(args.reference)
        result["reference_backend"] = args.reference_backend
        result.update(
            compare(_model_fn(model), reference, tokens, args.seq_len, args.batch_size, progress)
        )
    result["seconds"] = time.perf_counter() - start

    print(f"Model: {args.model} ({result['dtype']})")
    print(f"Text: {text_path} ({result['tokens']} predicted tokens, windows of {args.seq_len})")
    if "stderr" in result:
        print(f"Perplexity: {result['perplexity']:.4f} ± {result['stderr']:.4f} (loss {result['loss']:.5f})")
    else:
        print(f"Perplexity: {result['perplexity']:.4f} (loss {result['loss']:.5f})")
        print(
            f"Reference: {args.reference} ({args.reference_backend}, {result['reference_dtype']}): "
            f"perplexity {result['reference_perplexity']:.4f}"
        )
        print(
            f"KL(reference || model): {result['kl']:.3e} mean, {result['kl_max']:.3e} max; "
            f"top-1 agreement {result['top1_agreement']:.4%}; max |logit diff| "
            f"{result['max_logit_diff']:.3e}"
        )
    print(f"Time: {result['seconds']:.1f} s ({result['tokens'] / result['seconds']:.0f} tok/s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    from .cli import run

    run(main)
