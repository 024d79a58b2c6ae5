"""Fused projections (fused_projections.py): the same logits as the plain layout in
every path that decodes, the plain layout back exactly, and the fallbacks."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import batch_generate, generate_step, speculative_generate_step
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

from conftest import ODD_MUP, assert_close_logits, make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load
from mlx_falcon_h1.fused_projections import fuse_projections, fusion_summary, unfuse_projections

REL = 1e-5  # issue 23: fused vs plain logits, float32
BIASES = dict(attention_bias=True, projectors_bias=True, mlp_bias=True, mamba_proj_bias=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(plain, fused) of one checkpoint, and of a draft: unfolded odd multipliers
    and every bias, so each scale and bias of the fused form is exercised; head_dim
    32 for --kv-bits's groups."""
    made = {}
    for name, seed in (("main", 0), ("draft", 1)):
        path = tmp_path_factory.mktemp(name)
        make_checkpoint(path, seed=seed, head_dim=32, mamba_rms_norm=True, **ODD_MUP, **BIASES)
        make_tokenizer(path)
        made[name] = load(str(path), fuse=False), load(str(path))
    return made


def prompt(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(4, 96, size=n))


def decode(model, draft=None, n=12, **kwargs):
    """Greedy tokens and every logits array the model produced, through mlx-lm's loops."""
    logits = []

    def record(tokens, x):
        logits.append(np.array(x))
        return x

    if draft is None:
        steps = generate_step(prompt(30), model, max_tokens=n, logits_processors=[record], **kwargs)
    else:
        steps = speculative_generate_step(prompt(30), model, draft, max_tokens=n, num_draft_tokens=3,
                                          logits_processors=[record], **kwargs)  # fmt: skip
    tokens = [int(step[0]) for step in steps]
    return tokens, logits


def assert_same_decode(plain_run, fused_run):
    (plain_tokens, plain_logits), (fused_tokens, fused_logits) = plain_run, fused_run
    assert fused_tokens == plain_tokens and len(fused_logits) == len(plain_logits) > 0
    for p, f in zip(plain_logits, fused_logits):
        assert_close_logits(f, p, rel=REL)


def test_everything_fuses_and_nothing_is_kept_twice(models):
    plain, fused = models["main"][0][0], models["main"][1][0]
    assert fusion_summary(fused) == {"sets": 6, "fused": 6, "qkv_only": 0, "unfused": 0, "matmuls": 8}
    assert fusion_summary(plain)["matmuls"] == 18
    sizes = lambda m: sum(w.size for _, w in tree_flatten(m.parameters()))  # noqa: E731
    assert sizes(fused) == sizes(plain)
    for layer in fused.layers:  # the plain modules are gone from the tree and hold no arrays
        assert "q_proj" not in layer.self_attn and "in_proj" not in layer.mamba
        for _, _, member in layer.fused_in._members + layer.fused_out._members:
            assert not tree_flatten(member.parameters())


def test_full_forward(models):
    (plain, _), (fused, _) = models["main"]
    ids = prompt(40)[None]
    assert_close_logits(np.array(fused(ids)), np.array(plain(ids)), rel=REL)


@pytest.mark.parametrize("compiled", [True, False])
def test_single_decode_eager_and_compiled(models, monkeypatch, compiled):
    monkeypatch.setenv("MLX_FALCON_H1_COMPILE", "1" if compiled else "0")
    (plain, _), (fused, _) = models["main"]
    assert_same_decode(decode(plain), decode(fused))
    if compiled:
        assert fused._compiled_decode.traces > 0


@pytest.mark.parametrize("kwargs", [dict(kv_bits=8, kv_group_size=32, quantized_kv_start=0),
                                    dict(max_kv_size=16)], ids=["kv-bits", "max-kv-size"])  # fmt: skip
def test_kv_bits_and_max_kv_size(models, kwargs):
    (plain, _), (fused, _) = models["main"]
    assert_same_decode(decode(plain, **kwargs), decode(fused, **kwargs))


def test_speculative(models):
    (plain, _), (fused, _) = models["main"]
    (plain_draft, _), (fused_draft, _) = models["draft"]
    assert_same_decode(decode(plain, plain_draft), decode(fused, fused_draft))


def test_prompt_cache_file(models, tmp_path):
    runs = []
    for i, (model, _) in enumerate(models["main"]):
        cache = model.make_cache()
        mx.eval(model(prompt(25, seed=1)[None], cache=cache))
        save_prompt_cache(str(tmp_path / f"{i}.safetensors"), cache)
        runs.append(decode(model, prompt_cache=load_prompt_cache(str(tmp_path / f"{i}.safetensors"))))
    assert_same_decode(*runs)


def test_batch(models):
    """batch_generate (mlx-lm's BatchGenerator, which the server runs) with ragged prompts."""
    runs = []
    for model, tokenizer in models["main"]:
        logits = []

        def record(tokens, x):
            logits.append(np.array(x))
            return x

        prompts = [prompt(n, seed=n).tolist() for n in (33, 5, 18)]
        out = batch_generate(model, tokenizer, prompts, max_tokens=8, return_token_ids=True,
                             logits_processors=[record])  # fmt: skip
        runs.append((out.token_ids, logits))
    assert_same_decode(*runs)


def test_greedy_identical_over_256_tokens(models):
    (plain, _), (fused, _) = models["main"]
    plain_tokens, _ = decode(plain, n=256)
    fused_tokens, _ = decode(fused, n=256)
    assert fused_tokens == plain_tokens


def test_unfuse_gives_the_plain_layout_back_exactly(models):
    (plain, _), _ = models["main"]
    before = dict(tree_flatten(plain.parameters()))
    fuse_projections(plain)
    assert "fused_in" in plain.layers[0]
    unfuse_projections(plain)
    after = dict(tree_flatten(plain.parameters()))
    assert after.keys() == before.keys()
    assert all(mx.array_equal(after[k], before[k]).item() for k in before)


@pytest.mark.parametrize("recipe, summary", [
    ("affine4", {"fused": 6}),
    ("mxfp4", {"fused": 6}),
    # in_proj and o_proj at 8 bits, the rest at 4: q/k/v fuse without in_proj, o/out not at all.
    ("mixed", {"fused": 2, "qkv_only": 2, "unfused": 2}),
])  # fmt: skip
def test_quantized_fuses_per_set(models, recipe, summary):
    (plain, _), _ = models["main"]
    layers_and_linear = lambda p, m: isinstance(m, nn.Linear) and ".layers." in p and "down" not in p  # noqa: E731
    recipes = {
        "affine4": dict(group_size=32, bits=4, class_predicate=layers_and_linear),
        "mxfp4": dict(mode="mxfp4", class_predicate=layers_and_linear),
        "mixed": dict(class_predicate=lambda p, m: layers_and_linear(p, m) and dict(
            group_size=32, bits=8 if p.endswith(("in_proj", "o_proj")) else 4)),
    }  # fmt: skip
    unfuse_projections(plain)
    model = type(plain)(plain.args)
    model.update(plain.parameters())
    nn.quantize(model, **recipes[recipe])
    ids = prompt(20)[None]
    before = dict(tree_flatten(model.parameters()))
    want = np.array(model(ids))
    got = fuse_projections(model)
    assert got == {"sets": 6, "fused": 0, "qkv_only": 0, "unfused": 0, "matmuls": got["matmuls"], **summary}
    assert_close_logits(np.array(model(ids)), want, rel=REL)
    unfuse_projections(model)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    assert all(mx.array_equal(after[k], before[k]).item() for k in before)


def test_training_and_sharding_see_the_plain_layout(models):
    """LoRA conversion and sharding take the plain layout back first."""
    from mlx_falcon_h1.adapters import linear_to_lora_layers

    _, (fused, _) = models["draft"]
    fused.shard(type("Solo", (), {"size": lambda self: 1})())  # one rank: nothing split
    assert "q_proj" in fused.layers[0].self_attn and "fused_in" not in fused.layers[0]
    fuse_projections(fused)
    fused.freeze()  # as mlx-lm's tuner does: only the adapters train
    linear_to_lora_layers(fused, 1, {"rank": 2, "scale": 1.0, "dropout": 0.0})
    names = [k for k, _ in tree_flatten(fused.trainable_parameters())]
    assert names and all(k.endswith(("lora_a", "lora_b")) for k in names)
    assert any("self_attn.q_proj.lora_a" in k for k in names)


def test_same_logits_as_on_a_gpu(tmp_path, monkeypatch):
    """With the device reported as a GPU (MLX still runs on the CPU) the layers take
    the GPU's forms (activations in the residual stream's dtype, the residual adds
    inside the norms): the same logits, fused or not."""
    make_checkpoint(tmp_path, mlp_multipliers=[0.9, 1.0])
    make_tokenizer(tmp_path)
    plain, fused = load(str(tmp_path), fuse=False)[0], load(str(tmp_path))[0]
    ids = prompt(40)[None]
    want = np.array(plain(ids))
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    assert_close_logits(np.array(fused(ids)), want, rel=REL)
    assert_close_logits(np.array(plain(ids)), want, rel=REL)