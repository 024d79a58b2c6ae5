"""DWQ (mlx-lm's distilled weight quantization): start from plain quantization
(or --dwq-init gptq / awq) and learn the scales and biases of every quantized
layer by distillation: minimise KL(float || quantized) of the next-token
distributions at temperature 2 on the calibration text. The float model's
logits are computed first, one layer at a time (driver.teacher_logits), so
teacher and student are never in memory together.
"""

from contextlib import contextmanager

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from .awq import awq_quantize
from .driver import teacher_logits
from .gptq import gptq_quantize
from .layers import DequantizedLinear, dequantized_form, quantizable, restore_modules

def dwq_quantize(model, tokens, bits, group_size, scale_dtype, settings, log=print) -> None:
    """Plain (or --dwq-init gptq / awq) quantization, then the scales and biases
    learned by distillation."""
    from mlx_lm.tuner.losses import kl_div_loss

    n_valid = max(1, tokens.shape[0] // 8)
    rng = np.random.default_rng(settings.seed)
    order = rng.permutation(tokens.shape[0])
    valid, train = tokens[mx.array(np.sort(order[:n_valid]))], tokens[mx.array(np.sort(order[n_valid:]))]
    inputs = lambda t: t[:, :-1]  # noqa: E731
    t_train = teacher_logits(model, inputs(train), settings)
    t_valid = teacher_logits(model, inputs(valid), settings)

    if settings.dwq_init == "plain":
        nn.quantize(model, group_size, bits, class_predicate=lambda p, m: quantizable(m, group_size))
    else:
        init = {"gptq": gptq_quantize, "awq": awq_quantize}[settings.dwq_init]
        init(model, train, bits, group_size, scale_dtype, settings, log)
    swapped = dequantized_form(model)
    model.freeze()
    model.apply_to_modules(
        lambda _, m: m.unfreeze(keys=["scales", "biases"], recurse=False)
        if isinstance(m, DequantizedLinear) else None
    )
    params = tree_map(lambda p: p.astype(mx.float32), model.trainable_parameters())
    dtypes = tree_map(lambda p: p.dtype, model.trainable_parameters())
    scale = 1.0 / settings.temperature

    def loss_fn(params, x, target, idx):
        model.update(params)
        logits = model(x).astype(mx.float32)
        if idx is not None:
            logits = mx.take_along_axis(logits, idx, axis=-1)
        return kl_div_loss(scale * logits, scale * target).mean()

    def evaluate(params) -> float:
        total = 0.0
        for i in range(0, valid.shape[0], settings.batch_size):
            sl = slice(i, i + settings.batch_size)
            idx = None if t_valid[1] is None else t_valid[1][sl]
            total += loss_fn(params, inputs(valid)[sl], t_valid[0][sl], idx).item() * inputs(valid)[sl].shape[0]
        return total / valid.shape[0]

    opt = optim.Adam(learning_rate=settings.learning_rate, bias_correction=True)
    grad_fn = mx.value_and_grad(loss_fn)
    with checkpointed(model.layers[0], settings.grad_checkpoint):
        start = evaluate(params)
        best, best_params = start, params
        for epoch in range(settings.epochs):
            perm = rng.permutation(train.shape[0])
            for i in range(0, train.shape[0], settings.batch_size):
                sl = mx.array(np.sort(perm[i : i + settings.batch_size]))
                idx = None if t_train[1] is None else t_train[1][sl]
                loss, grads = grad_fn(params, inputs(train)[sl], t_train[0][sl], idx)
                params = opt.apply_gradients(grads, params)
                mx.eval(params, opt.state, loss)
            v = evaluate(params)
            log(f"[dwq] epoch {epoch + 1}/{settings.epochs}: held-back KL(T={settings.temperature:g}) {start:.4g} -> {v:.4g}")
            if v < best:
                best, best_params = v, params
    model.update(tree_map(lambda p, d: p.astype(d), best_params, dtypes))
    restore_modules(model, swapped)
    model.unfreeze()
    model.eval()


@contextmanager
def checkpointed(layer: nn.Module, enabled: bool):
    """mlx-lm's grad_checkpoint (recompute each decoder layer in the backward pass,
    so one layer's activations and dense weights are held at a time), undone on
    exit: it patches the layer's class."""
    cls = type(layer)
    call = cls.__call__
    if enabled:
        from mlx_lm.tuner.trainer import grad_checkpoint

        grad_checkpoint(layer)
    try:
        yield
    finally:
        cls.__call__ = call
