"""Fine-tuning through mlx-lm's tuner: gradients, LoRA targets, a LoRA run, fuse.

Gradients are checked against finite differences in float32 (float64 is not on
every MLX backend): the slope at 0 of a least-squares fit of s, s^3, s^5 to the
central differences at steps h, 2h, 3h, 4h, so the truncation error is O(h^6)
and the float32 rounding of the loss (~1e-6 relative) is averaged over 8
evaluations. Measured over 3 configurations x 6 random directions: worst
relative error 7e-3, median 1e-3 (the two-step Richardson estimate this
replaced reached 4e-2 on the same draws, with or without the fused CPU ops);
GRAD_TOL sits above that, and a gradient a few percent off, or a term that
does not propagate (error 1.0), lands far above it
(test_gradient_check_catches_a_dropped_term).
"""

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

import mlx_falcon_h1.model as model_module
from conftest import TINY, make_checkpoint, make_tokenizer
from mlx_falcon_h1 import load
from mlx_falcon_h1.folder_format import FORMAT_KEY
from mlx_falcon_h1.adapters import linear_to_lora_layers
from mlx_falcon_h1.lora import SSM_PARAMETERS
from mlx_falcon_h1.lora import load as load_with_adapters
from mlx_falcon_h1.model import Mixer, Model, ModelArgs

GRAD_STEP = 3e-3
GRAD_TOL = 1e-2
FIXTURE = Path(__file__).parent / "fixtures" / "tiny_falcon_h1_hf"
HELDOUT = Path(__file__).parents[1] / "mlx_falcon_h1" / "data" / "heldout.txt"



@pytest.fixture(autouse=True)
def reference_path(monkeypatch):
    """What training differentiates (mlx_falcon_h1/lora.py sets the same)."""
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")


def randomize(module: nn.Module, seed: int) -> None:
    """Random float32 parameters in the ranges the model meets (cf. conftest.randomize)."""
    rng = np.random.default_rng(seed)
    values = []
    for name, p in tree_flatten(module.parameters()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "A_log":
            v = rng.uniform(-2.0, 1.0, p.shape)  # decays from fast to slow
        elif leaf in ("dt_bias", "D"):
            v = rng.normal(size=p.shape)
        elif "norm" in name:
            v = 1.0 + 0.3 * rng.normal(size=p.shape)
        else:
            v = 0.3 * rng.normal(size=p.shape)
        values.append((name, mx.array(v.astype(np.float32))))
    module.load_weights(values)


def gradient_errors(module: nn.Module, loss, seed: int = 0) -> dict:
    """Per trainable parameter: |<grad, v> - numeric| / max(|both|) along a random v."""
    params = dict(tree_flatten(module.trainable_parameters()))
    _, grads = nn.value_and_grad(module, loss)()
    grads = dict(tree_flatten(grads))
    rng = np.random.default_rng(seed)
    errors = {}
    for name, p in params.items():
        v = mx.array(rng.normal(size=p.shape).astype(np.float32))
        analytic = (grads[name] * v).sum().item()

        def at(step):
            module.load_weights([(name, p + step * v)], strict=False)
            return loss().item()

        steps = GRAD_STEP * np.arange(1, 5)
        odd = np.array([(at(s) - at(-s)) / 2 for s in steps])  # s f'(0) + O(s^3)
        basis = np.stack([steps, steps**3, steps**5], axis=1)
        module.load_weights([(name, p)], strict=False)
        numeric = np.linalg.lstsq(basis, odd, rcond=None)[0][0]
        errors[name] = abs(numeric - analytic) / max(abs(numeric), abs(analytic), 1e-6)
    return errors


class MixerLoss(nn.Module):
    """A scalar of the mixer's output that every output element feeds, and its input as a parameter."""

    def __init__(self, args: ModelArgs, length: int = 20, seed: int = 0):
        super().__init__()
        self.mixer = Mixer(args)
        randomize(self.mixer, seed)
        rng = np.random.default_rng(seed + 1)
        self.u = mx.array(rng.normal(size=(2, length, args.hidden_size)).astype(np.float32))
        self._weights = mx.array(rng.normal(size=(2, length, args.hidden_size)).astype(np.float32))

    def __call__(self):
        return (self.mixer(self.u, None) * self._weights).sum()


MIXER_CONFIGS = {
    # 20 tokens over chunks of 16: the chunk carry and the padding are both in play.
    "groups2-norm-after-gate-bias": dict(
        mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=False,
        mamba_proj_bias=True,
    ),
    "groups3-norm-before-gate": dict(
        mamba_n_groups=3, mamba_rms_norm=True, mamba_norm_before_gate=True
    ),
    "groups1-no-norm": dict(mamba_n_groups=1, mamba_rms_norm=False),
}  # fmt: skip


@pytest.mark.parametrize("name", MIXER_CONFIGS)
def test_mixer_gradients_match_finite_differences(name):
    loss = MixerLoss(ModelArgs.from_dict({**TINY, **MIXER_CONFIGS[name]}))
    errors = gradient_errors(loss, loss)
    expected = {"u", "mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.conv1d.weight",
                "mixer.in_proj.weight", "mixer.out_proj.weight"}  # fmt: skip
    assert expected <= set(errors)
    worst = max(errors, key=errors.get)
    assert errors[worst] < GRAD_TOL, f"{worst}: relative error {errors[worst]:.2e}"


def test_gradient_check_catches_a_dropped_term(monkeypatch):
    """The check fails when a gradient path is cut (dt_bias through the softplus)."""
    discretize = model_module.discretize

    def cut(dt, dt_bias, A_log, limit):
        return discretize(dt, mx.stop_gradient(dt_bias), A_log, limit)

    monkeypatch.setattr(model_module, "discretize", cut)
    loss = MixerLoss(ModelArgs.from_dict({**TINY, **MIXER_CONFIGS["groups1-no-norm"]}))
    errors = gradient_errors(loss, loss)
    assert errors["mixer.dt_bias"] > 0.5
    assert max(e for k, e in errors.items() if k != "mixer.dt_bias") < GRAD_TOL


def tiny_model(seed: int = 0, **overrides) -> Model:
    model = Model(ModelArgs.from_dict({**TINY, **overrides}))
    randomize(model, seed)
    return model


def test_whole_model_gradients_match_transformers_autograd(tmp_path):
    """Every parameter's gradient of the loss mlx-lm trains on (padded batch, muP
    multipliers, G = 2, gated norm, biases) equals torch autograd's through
    transformers' FalconH1ForCausalLM on the same weights.

    Finite differences do not resolve the whole model in float32: the mean loss
    sits near log(vocab) while a layer's SSM parameters move it by ~1e-5, so
    float32 rounding of the loss swamps the difference quotient. The mixer is
    checked against finite differences above; here the reference is an
    independent autograd, which agrees to float32 rounding (~1e-6).
    """
    import torch
    from mlx_lm.tuner.trainer import default_loss

    from mlx_falcon_h1 import load_model

    reference = make_checkpoint(
        tmp_path, mamba_n_groups=2, mamba_rms_norm=True, attention_bias=True, mlp_bias=True
    )
    model, _ = load_model(str(tmp_path))
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, TINY["vocab_size"], (2, 21))
    lengths = np.array([[0, 20], [0, 14]])  # the second row is padded, as mlx-lm batches

    _, grads = nn.value_and_grad(model, default_loss)(model, mx.array(tokens), mx.array(lengths))
    grads = dict(tree_flatten(grads))

    logits = reference(torch.tensor(tokens[:, :-1])).logits
    steps = torch.arange(1, 21)
    mask = (steps >= torch.tensor(lengths[:, :1])) & (steps <= torch.tensor(lengths[:, 1:]))
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.tensor(tokens[:, 1:]).flatten(), reduction="none"
    )
    (ce.view(2, 20) * mask).sum().div(mask.sum()).backward()

    names = dict(reference.named_parameters())
    assert set(names) == set(grads)
    for name, p in names.items():
        ours = np.array(grads[name])
        if name.endswith("conv1d.weight"):
            ours = ours.swapaxes(1, 2)  # MLX (C, K, 1) -> HF (C, 1, K)
        ref = p.grad.numpy()
        worst = float(np.abs(ours - ref).max())
        assert 0 < np.abs(ref).max(), f"{name}: no gradient in the reference"
        assert worst <= 1e-4 * np.abs(ref).max(), f"{name}: max |diff| {worst:.2e}"


# --- LoRA targets -----------------------------------------------------------------

LORA_CONFIG = {"rank": 4, "scale": 10.0, "dropout": 0.0}
DEFAULT_TARGETS = {
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mamba.in_proj", "mamba.out_proj",
    "feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj",
}  # fmt: skip


def test_default_lora_targets_and_ssm_parameters_get_gradients():
    """mlx-lm's default targets are attention, the Mamba projections and the MLP;
    with `trainable`, A_log, D and dt_bias train too, and every one gets a gradient."""
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_lm.tuner.trainer import default_loss

    model = tiny_model(mamba_rms_norm=True)
    model.freeze()
    linear_to_lora_layers(model, -1, {**LORA_CONFIG, "trainable": list(SSM_PARAMETERS)})
    for layer in model.layers:
        lora = {name for name, m in layer.named_modules() if isinstance(m, LoRALinear)}
        assert lora == DEFAULT_TARGETS

    trainable = dict(tree_flatten(model.trainable_parameters()))
    ssm = {k for k in trainable if k.rsplit(".", 1)[-1] in ("A_log", "D", "dt_bias")}
    assert len(ssm) == 3 * len(model.layers)
    assert all(k.endswith(("lora_a", "lora_b")) for k in set(trainable) - ssm)

    tokens = mx.array(np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 21)))
    lengths = mx.array([[0, 20], [0, 20]])
    _, grads = nn.value_and_grad(model, default_loss)(model, tokens, lengths)
    for name, g in tree_flatten(grads):
        if not name.endswith("lora_a"):  # lora_b starts at 0, so lora_a's gradient does too
            assert mx.abs(g).max().item() > 0, f"{name} gets no gradient"


def test_unknown_trainable_parameter_is_named():
    model = tiny_model()
    model.freeze()
    with pytest.raises(ValueError, match=r"'mamba\.A'.*mamba\.A_log"):
        linear_to_lora_layers(model, -1, {**LORA_CONFIG, "trainable": ["mamba.A"]})


def test_lora_command_needs_a_falcon_model():
    """mlx-lm's default model (a Qwen) is not ours to train: the command says so."""
    import types

    from mlx_lm.lora import CONFIG_DEFAULTS

    from mlx_falcon_h1.lora import _run

    with pytest.raises(SystemExit, match="--model is required"):
        _run(types.SimpleNamespace(**CONFIG_DEFAULTS))


def test_data_the_run_cannot_read_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """What mlx-lm finds wrong only after loading the model, with a traceback."""
    import importlib.util
    import types

    from mlx_lm.lora import CONFIG_DEFAULTS

    from mlx_falcon_h1.lora import _check_data

    def check(**flags):
        _check_data(types.SimpleNamespace(**{**CONFIG_DEFAULTS, "train": False, **flags}))

    (tmp_path / "train.jsonl").write_text('{"text": "def f(): pass"}\n')
    (tmp_path / "test.jsonl").write_text("")
    check(train=True, data=str(tmp_path))  # valid.jsonl is optional
    with pytest.raises(ValueError, match="nothing to do: add --train"):
        check(data=str(tmp_path))
    with pytest.raises(ValueError, match=r"test\.jsonl: empty; --test reads it"):
        check(train=True, test=True, data=str(tmp_path))
    with pytest.raises(ValueError, match=r"train\.jsonl: a file; --data takes a folder"):
        check(train=True, data=str(tmp_path / "train.jsonl"))
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match=r"other/train\.jsonl: missing"):
        check(train=True, data=str(tmp_path / "other"))
    # A name that is no folder is a Hub dataset to mlx-lm, read with the datasets package.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets"
                        else real_find_spec(name, *a))  # fmt: skip
    with pytest.raises(ValueError, match="mlx-lm's default is the Hugging Face dataset .*pip install datasets"):
        check(train=True)
    with pytest.raises(ValueError, match="--data absent: no such folder"):
        check(train=True, data="absent")


# --- fuse -------------------------------------------------------------------------


def write_adapters(base: Path, out: Path, fine_tune_type: str = "lora") -> None:
    """Adapters with a real effect (random lora_b, moved SSM parameters), saved the way mlx-lm's trainer saves them."""
    from mlx_lm.utils import save_config

    model, _ = load(str(base))
    model.freeze()
    config = {**LORA_CONFIG, "trainable": list(SSM_PARAMETERS)}
    linear_to_lora_layers(model, 1, config, use_dora=fine_tune_type == "dora")
    rng = np.random.default_rng(3)
    trained = {
        k: v + mx.array(0.05 * rng.normal(size=v.shape).astype(np.float32)).astype(v.dtype)
        for k, v in tree_flatten(model.trainable_parameters())
    }
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), trained)
    save_config(
        {"fine_tune_type": fine_tune_type, "num_layers": 1, "lora_parameters": config},
        out / "adapter_config.json",
    )


@pytest.mark.parametrize(
    "base_kind, fine_tune_type", [("hf", "lora"), ("hf", "dora"), ("converted", "lora")]
)
def test_fused_model_reloads_to_the_adapted_logits(tmp_path, monkeypatch, base_kind, fine_tune_type):
    """python -m mlx_falcon_h1.fuse writes a folder our loader reloads to adapter + base
    logits: from an HF base (unfolded weights) and from a converted one (folded)."""
    import mlx_lm.fuse

    hf = tmp_path / "hf"
    make_checkpoint(hf, mamba_rms_norm=True)
    make_tokenizer(hf)
    base = hf
    if base_kind == "converted":
        from mlx_falcon_h1_convert.convert import convert

        base = tmp_path / "converted"
        convert(str(hf), str(base))
    adapters = tmp_path / "adapters"
    write_adapters(base, adapters, fine_tune_type)

    ids = mx.array(np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 24)))
    adapted = load_with_adapters(str(base), adapter_path=str(adapters))[0](ids)
    plain = load(str(base))[0](ids)

    for name in ("load", "save"):  # restored after the test: fuse_main swaps them
        monkeypatch.setattr(mlx_lm.fuse, name, getattr(mlx_lm.fuse, name))
    fused = tmp_path / "fused"
    argv = ["mlx_falcon_h1.fuse", "--model", str(base), "--adapter-path", str(adapters)]
    monkeypatch.setattr(sys, "argv", argv + ["--save-path", str(fused)])
    from mlx_falcon_h1.lora import fuse_main

    fuse_main()

    record = json.loads((fused / "config.json").read_text())[FORMAT_KEY]
    assert record["multipliers_folded"] is (base_kind == "converted")
    reloaded = load(str(fused))[0](ids)
    scale = mx.abs(adapted).max().item()
    assert mx.abs(adapted - plain).max().item() > 0.05 * scale  # the adapter matters
    assert mx.abs(reloaded - adapted).max().item() <= 1e-5 * scale


# --- a LoRA run through the command -----------------------------------------------

WINDOW = 128  # tokens per example
LORA_ITERS = 40


def _float32_copy(source: Path, out: Path) -> Path:
    """The fixture with float32 weights: bfloat16 matmuls are slow on MLX's CPU backend."""
    import shutil

    out.mkdir()
    for f in source.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    weights = mx.load(str(source / "model.safetensors"))
    mx.save_safetensors(
        str(out / "model.safetensors"), {k: v.astype(mx.float32) for k, v in weights.items()}
    )
    return out


def _write_jsonl(path: Path, texts) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def _test_loss(folder: Path, adapters: Optional[Path], texts) -> float:
    """Mean next-token cross-entropy over `texts`, computed here (mlx-lm's --test
    prints one too, but its wording is its own)."""
    model, tokenizer = load_with_adapters(str(folder), adapter_path=None if adapters is None else str(adapters))
    total = count = 0
    for text in texts:
        ids = mx.array(tokenizer.encode(text))[None]
        logits = model(ids[:, :-1]).astype(mx.float32)
        total += nn.losses.cross_entropy(logits, ids[:, 1:], reduction="sum").item()
        count += ids.shape[1] - 1
    return total / count


def test_lora_run_lowers_heldout_loss(tmp_path):
    """python -m mlx_falcon_h1.lora adapts the trained fixture to text it never saw.

    The held-out text is cut into 128-token windows: every 8th is test data, the
    rest train LoRA adapters and the SSM parameters (--train-ssm) for 40 steps;
    the test loss, over windows training never sees, drops (by ~0.1 here).
    """
    from transformers import AutoTokenizer

    base = _float32_copy(FIXTURE, tmp_path / "base")
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer.encode(HELDOUT.read_text(encoding="utf-8"))
    windows = [tokenizer.decode(ids[i : i + WINDOW]) for i in range(0, len(ids) - WINDOW, WINDOW)]
    data = tmp_path / "data"
    data.mkdir()
    _write_jsonl(data / "train.jsonl", [w for j, w in enumerate(windows) if j % 8 not in (0, 4)])
    _write_jsonl(data / "valid.jsonl", [w for j, w in enumerate(windows) if j % 8 == 4][:4])
    tests = [w for j, w in enumerate(windows) if j % 8 == 0][:16]
    _write_jsonl(data / "test.jsonl", tests)

    command = [sys.executable, "-m", "mlx_falcon_h1.lora", "--model", str(base), "--data", str(data)]
    command += ["--test", "--batch-size", "4", "--max-seq-length", str(WINDOW + 16)]
    run = dict(capture_output=True, text=True, timeout=600)
    before = subprocess.run(command + ["--adapter-path", ""], **run)  # no adapters: the base
    assert before.returncode == 0, before.stderr[-3000:]

    adapters = tmp_path / "adapters"
    train = ["--train", "--train-ssm", "--adapter-path", str(adapters), "--iters", str(LORA_ITERS)]
    train += ["--num-layers", "-1", "--learning-rate", "5e-4", "--steps-per-report", "5"]
    train += ["--steps-per-eval", "1000", "--val-batches", "1", "--seed", "0"]
    after = subprocess.run(command + train, **run)
    assert after.returncode == 0, after.stderr[-3000:]
    print(after.stdout[-3000:])  # the loss curve, with -s

    loss_before, loss_after = _test_loss(base, None, tests), _test_loss(base, adapters, tests)
    print(f"test loss {loss_before:.3f} -> {loss_after:.3f}")
    assert loss_after < loss_before - 0.04, (loss_before, loss_after)
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    trained = mx.load(str(adapters / "adapters.safetensors"))
    assert sum(k.endswith(SSM_PARAMETERS) for k in trained) == 3 * layers


def test_more_layers_than_the_model_has_trains_them_all(capsys, monkeypatch):
    """mlx-lm's default --num-layers (16) on a 2-layer model: every layer is tuned,
    a line says so, and the cap is what adapter_config.json records (the fuse
    and load_adapters rebuild from it); -1 keeps meaning all."""
    import types

    from mlx_lm.lora import CONFIG_DEFAULTS

    from mlx_falcon_h1 import lora

    seen = []
    monkeypatch.setattr(lora, "mlx_lm_lora_train_model", lambda args, *_: seen.append(args.num_layers))
    for requested in (CONFIG_DEFAULTS["num_layers"], 2, 1, -1):
        lora._train_model(types.SimpleNamespace(num_layers=requested), tiny_model(), None, None)
    assert seen == [2, 2, 1, -1]
    assert capsys.readouterr().out.strip().splitlines() == [
        "the model has 2 layers: training all 2 (--num-layers 16)"
    ]
