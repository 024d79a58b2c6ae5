"""GPTQ (Frantar et al. 2022, arXiv:2210.17323): per linear layer, quantize column
by column and push each column's rounding error onto the columns not yet
quantized, weighted by the inverse Hessian of the layer's inputs.

Layer by layer: a decoder layer's inputs come from the already quantized layers
before it. lm_head too (its inputs: the final norm's output); the embedding has
no inputs to weigh by and is quantized plainly.
"""

import mlx.core as mx
import numpy as np

from .driver import capture_inputs, decoder, embed, linears, run_batched
from .layers import dequantized_form, module_at, quantizable, quantized_linear, restore_modules, set_module, to_float32

SHRINK = np.linspace(1.0, 0.6, 9)  # range fractions tried per group (GPTQ, embeddings)


def group_grid(w: np.ndarray, weight: np.ndarray, bits: int, scale_dtype: mx.Dtype):
    """Scale and bias (O, 1) for one group of columns w (O, g): of the ranges
    around the middle of [min, max], p times as wide, for p in SHRINK, the one whose rounding error
    sum_k weight_k (w_k - dq_k)^2 is least per row (weight: (g,), e.g. diag H).
    Rounded to scale_dtype, as they will be stored."""
    n_bins = 2**bits - 1
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    best = best_s = best_b = None
    for p in SHRINK:
        s = np.maximum(2 * half * p / n_bins, 1e-8)
        b = mid - half * p
        s = np.array(mx.array(s, dtype=mx.float32).astype(scale_dtype).astype(mx.float32), dtype=np.float64)
        b = np.array(mx.array(b, dtype=mx.float32).astype(scale_dtype).astype(mx.float32), dtype=np.float64)
        dq = s * np.clip(np.round((w - b) / s), 0, n_bins) + b
        err = (((w - dq) ** 2) * weight).sum(axis=1, keepdims=True)
        if best is None:
            best, best_s, best_b = err, s, b
        else:
            better = err < best
            best = np.where(better, err, best)
            best_s, best_b = np.where(better, s, best_s), np.where(better, b, best_b)
    return best_s, best_b


def gptq_weight(w: mx.array, hessian: mx.array, bits: int, group_size: int,
                scale_dtype: mx.Dtype, damp: float = 0.01):  # fmt: skip
    """GPTQ for one weight w (O, I) given H = sum x x^T of its inputs (I, I).

    Returns (q (O, I) integers, scales, biases (O, I / group_size) in
    scale_dtype). Each group's grid is chosen when the group is reached, from
    the group's columns as updated so far (group_grid, weighted by diag H).
    Columns are taken in order, errors spread over the later columns with the
    upper Cholesky factor of H^-1 (the paper's Algorithm 1, with its lazy block
    updates at group boundaries).
    """
    W = np.array(w.astype(mx.float32), dtype=np.float64)
    H = np.array(hessian, dtype=np.float64)
    dead = np.diag(H) == 0  # inputs never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H[np.diag_indices_from(H)] += damp * np.mean(np.diag(H))
    U = np.linalg.cholesky(np.linalg.inv(H)).T  # upper: H^-1 = U^T U
    n_bins = 2**bits - 1
    O, I = W.shape
    Q = np.zeros((O, I), dtype=np.uint32)
    all_scales, all_biases = [], []
    for i in range(0, I, group_size):
        j = i + group_size
        s64, b64 = group_grid(W[:, i:j], np.diag(H)[i:j], bits, scale_dtype)
        all_scales.append(mx.array(s64, dtype=mx.float32).astype(scale_dtype))
        all_biases.append(mx.array(b64, dtype=mx.float32).astype(scale_dtype))
        E = np.zeros((O, group_size))
        for k in range(i, j):
            q = np.clip(np.round((W[:, k : k + 1] - b64) / s64), 0, n_bins)
            Q[:, k] = q[:, 0]
            e = (W[:, k : k + 1] - (s64 * q + b64)) / U[k, k]
            W[:, k + 1 : j] -= e @ U[k : k + 1, k + 1 : j]
            E[:, k - i] = e[:, 0]
        W[:, j:] -= E @ U[i:j, j:]
    return Q, mx.concatenate(all_scales, axis=1), mx.concatenate(all_biases, axis=1)


def _hessian(state, x):
    x = x.reshape(-1, x.shape[-1])
    h = x.T @ x
    return h if state is None else state + h


def gptq_quantize(model, tokens, bits, group_size, scale_dtype, settings, log=print) -> None:
    """GPTQ every quantizable Linear, decoder layer by decoder layer, in place."""
    embed_tokens = model.model.embed_tokens
    if quantizable(embed_tokens, group_size):  # no inputs to weigh by: plain
        model.model.embed_tokens = embed_tokens.to_quantized(group_size=group_size, bits=bits)
    x = run_batched(lambda t: embed(model, t), tokens, settings.batch_size)

    def quantize_layer(root, paths, x):
        hessians = capture_inputs(root, paths, x, settings.batch_size, _hessian)
        for p in paths:
            layer = module_at(root, p)
            q, s, b = gptq_weight(layer.weight, hessians.pop(p), bits, group_size, scale_dtype)
            set_module(root, p, quantized_linear(layer, q, s, b, bits, group_size))

    for n, layer in enumerate(model.layers):
        originals = to_float32(layer)
        quantize_layer(layer, list(linears(layer, group_size)), x)
        swapped = dequantized_form(layer)
        x = run_batched(decoder(layer), x, settings.batch_size)  # through the quantized layer
        restore_modules(layer, swapped)
        del originals
        mx.clear_cache()
        log(f"[gptq] layer {n + 1}/{len(model.layers)}")
    if not model.args.tie_word_embeddings and quantizable(model.lm_head, group_size):
        h = run_batched(lambda v: model.model.final_layernorm(v), x, settings.batch_size)
        H = None
        for i in range(0, h.shape[0], settings.batch_size):
            H = _hessian(H, h[i : i + settings.batch_size])
            mx.eval(H)
        q, s, b = gptq_weight(model.lm_head.weight, H, bits, group_size, scale_dtype)
        model.lm_head = quantized_linear(model.lm_head, q, s, b, bits, group_size)
