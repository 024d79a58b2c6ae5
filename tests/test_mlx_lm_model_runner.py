"""mlx-lm's own checks of a model, applied to ours (issue 27).

mlx-lm runs every architecture it ships through `model_test_runner` in its
tests/test_models.py, and its `falcon_h1` through `test_falcon_h1` and
`test_falcon_h1_without_cache`. These are those checks, written for our Model,
as read in mlx-lm 0.32.2 (the PyPI sdist mlx_lm-0.32.2.tar.gz, sha256
1af8a92f...3a1fe9; GitHub commit d78bf58e has the same runner less its
integer-weight guard):
- the model reports its layers and model_type;
- in float32 and in float16 the logits keep the weights' dtype, with and
  without a cache, for a prompt and for the one-token step after it;
- a batch of two rows gives logits of batch shape;
- cached and uncached logits agree, and a loss has finite gradients;
- `copy.deepcopy(model)` works.

Beyond mlx-lm: the cached step is checked against a full pass (not only its
shape), and the copy is checked after the model has run its compiled decode
step (decode.py), which mlx-lm's runner reaches too (its float16 step is our
second decode step) and which once made deepcopy fail with "cannot pickle
'function' object". The copy must decode the same logits through a step of
its own, not the original's trace, which reads the original's weights.
"""

import copy
import pickle

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import make_prompt_cache

from conftest import TINY
from mlx_falcon_h1.model import Model, ModelArgs

PROMPT = mx.array([[5, 17, 3, 40, 9, 11, 60]])
NEXT = mx.array([[2, 33, 71]])  # fed one token at a time after PROMPT

# How far a cached step may sit from a full pass, in units of rounding of the
# dtype (its machine epsilon) times max |logit|. The two paths run the same
# weights through the same ops, but some reductions in another order: the SSM
# state carried by the recurrence instead of the chunked scan, attention over
# cached keys instead of a causal mask. Each reordered sum moves its value by a
# few units of rounding; two layers of normalized activations keep that from
# compounding. 16 units leaves room for it, while a wrong or stale state moves
# the logits by about their own size. (Measured: float32 within 1e-7 of
# max |logit|, float16 identical.)
ROUNDING_UNITS = 16
EPSILON = {mx.float32: 2.0**-23, mx.float16: 2.0**-10}


def tiny_model(seed: int = 0) -> Model:
    mx.random.seed(seed)
    model = Model(ModelArgs.from_dict(TINY))
    mx.eval(model.parameters())
    return model


def cast(model: Model, dtype) -> None:
    """Every floating parameter to `dtype`, as mlx-lm's runner casts them."""
    model.update(tree_map(lambda p: p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
                          model.parameters()))  # fmt: skip


def decode(model: Model) -> np.ndarray:
    """Logits of PROMPT (prefilled with a cache) and of each NEXT token fed one at
    a time: (1, L, vocab), float32. The second one-token call takes the compiled
    step (the first runs eagerly, by design: decode.py)."""
    cache = model.make_cache()
    out = [model(PROMPT, cache=cache)]
    for i in range(NEXT.shape[1]):
        out.append(model(NEXT[:, i : i + 1], cache=cache))
    return np.array(mx.concatenate(out, axis=1).astype(mx.float32))


def assert_close(ours: np.ndarray, ref: np.ndarray, dtype) -> None:
    bound = ROUNDING_UNITS * EPSILON[dtype] * float(np.abs(ref).max())
    worst = float(np.abs(ours - ref).max())
    assert worst <= bound, f"max |diff| {worst:.3g} > {bound:.3g} ({dtype})"


@pytest.fixture(autouse=True)
def compiled_step_on(monkeypatch):
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1")  # whatever the caller's shell says


def test_layers_and_model_type():
    model = tiny_model()
    assert len(model.layers) == TINY["num_hidden_layers"]
    assert model.model_type == "falcon_h1"


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
def test_logits_keep_the_dtype_and_shape(dtype):
    model = tiny_model()
    cast(model, dtype)
    vocab = TINY["vocab_size"]
    inputs = mx.array([[0, 1]])
    logits = model(inputs)
    assert logits.shape == (1, 2, vocab) and logits.dtype == dtype
    cache = make_prompt_cache(model)  # mlx-lm's: it asks model.make_cache()
    logits = model(inputs, cache=cache)
    assert logits.shape == (1, 2, vocab) and logits.dtype == dtype
    for _ in range(2):  # the eager first step, then the compiled one
        logits = model(mx.argmax(logits[0, -1:, :], keepdims=True), cache=cache)
        assert logits.shape == (1, 1, vocab) and logits.dtype == dtype
    assert model._compiled_decode.traces == 1


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16], ids=["float32", "float16"])
def test_cached_steps_match_a_full_pass(dtype):
    model = tiny_model()
    cast(model, dtype)
    full = np.array(model(mx.concatenate([PROMPT, NEXT], axis=1)).astype(mx.float32))
    assert_close(decode(model), full, dtype)
    assert model._compiled_decode.traces == 1  # the comparison covered the compiled step


def test_batches():
    model = tiny_model()
    vocab = TINY["vocab_size"]
    inputs = mx.array([[0, 1], [2, 3]])
    assert model(inputs).shape == (2, 2, vocab)
    cache = model.make_cache()
    assert model(inputs, cache=cache).shape == (2, 2, vocab)
    for _ in range(2):
        assert model(mx.array([[4], [5]]), cache=cache).shape == (2, 1, vocab)


def test_cache_does_not_change_logits_and_gradients_are_finite():
    """mlx-lm's test_falcon_h1_without_cache: two rows, with and without a cache."""
    model = tiny_model()
    inputs, targets = mx.array([[0, 1, 2], [2, 1, 0]]), mx.array([[1, 2, 3], [1, 0, 3]])
    logits = np.array(model(inputs))
    assert_close(np.array(model(inputs, cache=model.make_cache())), logits, mx.float32)

    def loss(m):
        return nn.losses.cross_entropy(m(inputs), targets).mean()

    value, grads = nn.value_and_grad(model, loss)(model)
    assert np.isfinite(value.item())
    assert all(np.isfinite(np.array(g)).all() for _, g in tree_flatten(grads))


def test_copy_before_and_after_the_compiled_step():
    model = tiny_model()
    copy.deepcopy(model)  # mlx-lm's check, on a model that has not run yet
    logits = decode(model)
    step = model._compiled_decode
    assert step.traces == 1  # the original has run its compiled step

    twin = copy.deepcopy(model)
    assert twin.__dict__.get("_compiled_decode") is None  # it will make its own
    assert model._compiled_decode is step  # the original keeps its step
    for (name, a), (_, b) in zip(tree_flatten(model.parameters()), tree_flatten(twin.parameters())):
        assert a is not b and np.array_equal(np.array(a), np.array(b)), name
    twin.update(twin.parameters())  # the copy is a whole module
    assert_close(decode(twin), logits, mx.float32)
    assert twin._compiled_decode is not step and twin._compiled_decode.traces == 1

    # Each decodes with its own weights: change the original's, the copy's
    # logits stay, and the original's own step sees the change.
    model.update(tree_map(lambda p: p * 0.5, model.parameters()))
    assert_close(decode(twin), logits, mx.float32)
    assert not np.allclose(decode(model), logits)

    # Pickled too (mlx-lm's comment says "copied / pickled").
    restored = pickle.loads(pickle.dumps(twin))
    assert_close(decode(restored), logits, mx.float32)
