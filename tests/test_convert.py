"""The converter: round trips, quantization modes, stock mlx-lm loading, safety."""

import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx_lm.convert import mixed_quant_predicate_builder
from safetensors.numpy import load_file, save_file

from conftest import assert_close_logits, edit_config, make_checkpoint, make_tokenizer, reference_logits
from mlx_falcon_h1 import CheckpointError, load_model
from mlx_falcon_h1_convert import convert

IDS = np.random.default_rng(7).integers(0, 96, size=(2, 45))

# Every mode and bit width the installed MLX offers, with its group size.
QUANT_CASES = [
    dict(q_mode="affine", q_bits=2, q_group_size=32),
    dict(q_mode="affine", q_bits=3, q_group_size=64),
    dict(q_mode="affine", q_bits=4, q_group_size=64),
    dict(q_mode="affine", q_bits=5, q_group_size=32),
    dict(q_mode="affine", q_bits=6, q_group_size=64),
    dict(q_mode="affine", q_bits=8, q_group_size=32),
    dict(q_mode="mxfp4"),
    dict(q_mode="nvfp4"),
    dict(q_mode="mxfp8"),
]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random Falcon-H1 with tokenizer; every bias on so folding of biases is checked."""
    path = tmp_path_factory.mktemp("hf")
    torch_model = make_checkpoint(
        path, attention_bias=True, mamba_proj_bias=True, projectors_bias=True, mlp_bias=True
    )
    make_tokenizer(path)
    return path, reference_logits(torch_model, IDS)


def logits_of(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def folder_state(parent: Path) -> set:
    return {p.name for p in parent.iterdir()}


@pytest.mark.parametrize(
    "overrides, dropped",
    [
        ({}, []),
        (dict(tie_word_embeddings=True), []),
        (dict(mamba_rms_norm=True, mamba_norm_before_gate=True), []),
        # Keys whose default differs between transformers and stock mlx-lm.
        (dict(mamba_rms_norm=True, mamba_chunk_size=256),
         ["tie_word_embeddings", "mamba_norm_before_gate", "mamba_chunk_size"]),
    ],
    ids=["realistic", "tied", "rms_norm", "sparse_config"],
)  # fmt: skip
def test_float_round_trip_matches_transformers_in_ours_and_stock(tmp_path, overrides, dropped):
    torch_model = make_checkpoint(tmp_path / "hf", **overrides)
    edit_config(tmp_path / "hf", **{key: None for key in dropped})
    ref = reference_logits(torch_model, IDS)
    convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32")
    assert_close_logits(logits_of(load_model(tmp_path / "mlx")[0]), ref)
    # Stock mlx-lm's falcon_h1 runs the same folder to the same logits: the
    # multipliers (key included) are in the weights, and it does not fold again.
    stock, _ = mlx_lm.utils.load_model(tmp_path / "mlx")
    assert_close_logits(logits_of(stock), ref)


def test_configuration_stock_cannot_express_is_flagged(tmp_path, capsys):
    make_checkpoint(tmp_path / "hf", mamba_n_groups=2, mamba_rms_norm=True)
    convert(str(tmp_path / "hf"), str(tmp_path / "mlx"))
    assert "normalises over all channels, not per group" in capsys.readouterr().out


def test_output_folder_contents(source, tmp_path):
    path, _ = source
    convert(str(path), str(tmp_path / "out"), quantize=True, dtype="bfloat16", max_shard_size_gb=1e-4)
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(index["weight_map"].values()) == {s.name for s in shards}
    for name in ("tokenizer.json", "tokenizer_config.json", "quality_report.json", "README.md"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["mlx_falcon_h1"]["multipliers_folded"] is True
    assert config["quantization"]["bits"] == 4 and config["quantization"]["mode"] == "affine"
    assert config["quantization_config"] == config["quantization"]
    # The weights carry the key multiplier: config.json says 1.0 (a reader that
    # scales keys at run time must not scale them again) and records the original.
    assert config["key_multiplier"] == 1.0
    assert config["mlx_falcon_h1"]["multipliers"]["key_multiplier"] == pytest.approx(0.39062499999999994)
    card = (out / "README.md").read_text()
    assert "q_bits: `4`" in card and "mean KL" in card

    # Falcon-aware precision: SSM parameters, conv and norms unquantized; every
    # floating tensor in the target dtype (tests/test_folder_layout.py).
    tensors = {}
    for shard in shards:
        tensors.update(mx.load(str(shard)))
    for name, w in tensors.items():
        if any(k in name for k in ("A_log", "mamba.D", "dt_bias", "conv1d", "norm")):
            assert w.dtype == mx.bfloat16, name
            assert f"{name.rsplit('.', 1)[0]}.scales" not in tensors, name
    assert tensors["model.layers.0.mamba.in_proj.weight"].dtype == mx.uint32
    assert tensors["model.layers.0.mamba.in_proj.bias"].dtype == mx.bfloat16


@pytest.mark.parametrize("case", QUANT_CASES, ids=lambda c: f"{c['q_mode']}{c.get('q_bits', '')}")
def test_quantized_round_trip(source, tmp_path, case):
    path, ref = source
    report = convert(str(path), str(tmp_path / "q"), quantize=True, dtype="float32", **case)
    ours = logits_of(load_model(tmp_path / "q")[0])
    stock = logits_of(mlx_lm.utils.load_model(tmp_path / "q")[0])
    assert_close_logits(stock, ours, rel=1e-5)  # same quantized weights, same math
    assert report == json.loads((tmp_path / "q" / "quality_report.json").read_text())
    assert report["tokens"] == 256
    assert 0.0 <= report["mean_kl"] < 0.5
    assert 0.0 <= report["top1_agreement"] <= 1.0
    assert np.isfinite(report["max_logit_diff"])
    # Quantization moved the logits, but not beyond what its bit width allows.
    worst = np.abs(ours - ref).max() / np.abs(ref).max()
    assert 0 < worst < 1.0


def test_more_bits_less_error_and_deterministic(source, tmp_path):
    path, _ = source
    r2 = convert(str(path), str(tmp_path / "a"), quantize=True, q_bits=2, q_group_size=32)
    r8 = convert(str(path), str(tmp_path / "b"), quantize=True, q_bits=8, q_group_size=32)
    again = convert(str(path), str(tmp_path / "c"), quantize=True, q_bits=2, q_group_size=32)
    assert r8["mean_kl"] < r2["mean_kl"] and r8["max_logit_diff"] < r2["max_logit_diff"]
    assert again == r2


def test_recipe(source, tmp_path):
    path, _ = source
    convert(str(path), str(tmp_path / "m"), quantize=True, quant_predicate="mixed_3_6", q_group_size=32)
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    # mlx-lm's rule, as the installed mlx-lm's own predicate decides it (0.32, 2
    # layers: the last layer's v_proj/down_proj and lm_head get 6 bits, the rest 3).
    rule = mixed_quant_predicate_builder("mixed_3_6", load_model(path)[0], 32)
    names = ["model.layers.1.self_attn.v_proj", "lm_head", "model.layers.0.self_attn.v_proj",
             "model.layers.0.mamba.in_proj"]  # fmt: skip (down_proj's 80 inputs: not in groups of 32)
    assert [q[n]["bits"] for n in names] == [rule(n, None)["bits"] for n in names]
    assert {q[n]["bits"] for n in names} == {3, 6}  # mixed, as the recipe says
    ours = logits_of(load_model(tmp_path / "m")[0])
    assert_close_logits(logits_of(mlx_lm.utils.load_model(tmp_path / "m")[0]), ours, rel=1e-5)


def test_reconverting_our_output_does_not_fold_twice(source, tmp_path):
    path, ref = source
    convert(str(path), str(tmp_path / "f"), dtype="float32")
    convert(str(tmp_path / "f"), str(tmp_path / "g"), dtype="float32")
    assert_close_logits(logits_of(load_model(tmp_path / "g")[0]), ref)


def test_dequantize(source, tmp_path):
    path, _ = source
    convert(str(path), str(tmp_path / "q"), quantize=True, q_bits=4, q_group_size=32, dtype="float32")
    convert(str(tmp_path / "q"), str(tmp_path / "d"), dequantize=True)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert "quantization" not in config
    assert_close_logits(
        logits_of(load_model(tmp_path / "d")[0]), logits_of(load_model(tmp_path / "q")[0]), rel=1e-5
    )


def test_narrow_layers_are_left_unquantized(tmp_path):
    # intermediate 80 is not a multiple of 64: down_proj cannot be grouped by 64.
    make_checkpoint(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "q"), quantize=True, q_group_size=64)
    tensors = mx.load(str(tmp_path / "q" / "model.safetensors"))
    assert "model.layers.0.feed_forward.down_proj.scales" not in tensors
    assert "model.layers.0.feed_forward.up_proj.scales" in tensors
    load_model(tmp_path / "q")


# --- safety and errors -------------------------------------------------------


def test_refuses_existing_destination_unless_forced(source, tmp_path):
    path, ref = source
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "precious.txt").write_text("user data")
    with pytest.raises(ValueError, match=r"already exists.*--force"):
        convert(str(path), str(dest))
    assert (dest / "precious.txt").read_text() == "user data"
    convert(str(path), str(dest), force=True, dtype="float32")
    assert not (dest / "precious.txt").exists()
    assert folder_state(tmp_path) == {"out"}
    assert_close_logits(logits_of(load_model(dest)[0]), ref)


def break_source(source_path: Path, tmp_path: Path, how: str) -> Path:
    broken = tmp_path / "broken"
    make_checkpoint(broken, max_shard_size="100KB" if how == "missing_shard" else None)
    if how == "not_falcon":
        config = json.loads((broken / "config.json").read_text())
        config["model_type"] = "mamba2"
        (broken / "config.json").write_text(json.dumps(config))
    elif how == "missing_shard":
        sorted(broken.glob("model-*.safetensors"))[-1].unlink()
    elif how == "truncated":
        file = broken / "model.safetensors"
        file.write_bytes(file.read_bytes()[:-100])
    elif how == "wrong_shape":
        tensors = load_file(broken / "model.safetensors")
        tensors["model.layers.1.mamba.D"] = np.zeros(7, np.float32)
        save_file(tensors, broken / "model.safetensors")
    return broken


@pytest.mark.parametrize(
    "how, pattern",
    [
        ("not_falcon", r"model_type is 'mamba2'"),
        ("missing_shard", r"model-\d+-of-\d+\.safetensors: listed in model\.safetensors\.index\.json but missing"),
        ("truncated", r"model\.safetensors: truncated"),
        ("wrong_shape", r"tensor model\.layers\.1\.mamba\.D has shape \(7,\), the config needs \(6,\)"),
    ],
)
def test_bad_input_names_the_fault_and_leaves_nothing(source, tmp_path, how, pattern):
    broken = break_source(source[0], tmp_path, how)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    with pytest.raises(ValueError, match=pattern):
        convert(str(broken), str(out_parent / "mlx"), quantize=True)
    assert folder_state(out_parent) == set()


def test_unwritable_destination(source, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"a_file: cannot write the output there"):
        convert(str(source[0]), str(blocker / "mlx"))


def test_interrupted_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = mx.save_safetensors
    monkeypatch.setattr(mx, "save_safetensors", interrupted)
    out_parent = tmp_path / "outputs"
    out_parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        convert(str(source[0]), str(out_parent / "mlx"), max_shard_size_gb=1e-4)
    assert len(calls) == 2 and folder_state(out_parent) == set()


def test_offline_hub_id_is_a_clear_error(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported (conftest imports
    # transformers first): set its constant, or this would reach for the network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match=r"no-such-org/no-such-model: not a local folder, and fetching"):
        convert("no-such-org/no-such-model", str(tmp_path / "out"))
    assert folder_state(tmp_path) == set()


def test_command_line(source, tmp_path):
    cmd = ["mlx-falcon-h1-convert", "--hf-path", str(source[0]), "--mlx-path", str(tmp_path / "o")]
    exe = Path(sys.executable).parent / cmd[0]
    done = subprocess.run([str(exe)] + cmd[1:] + ["-q", "--q-bits", "8"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "[quality]" in done.stdout and (tmp_path / "o" / "config.json").exists()
    again = subprocess.run([str(exe)] + cmd[1:], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr


def test_remote_code_runs_our_implementation_in_stock_mlx_lm(tmp_path):
    """A configuration stock mlx-lm computes wrongly (grouped gated norm), run
    through mlx-lm's own loader with trust_remote_code, matches transformers."""
    torch_model = make_checkpoint(tmp_path / "hf", mamba_n_groups=2, mamba_rms_norm=True)
    make_tokenizer(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "mlx"), dtype="float32", remote_code=True)
    model, _ = mlx_lm.utils.load_model(tmp_path / "mlx", trust_remote_code=True)
    assert type(model).__module__ == "mlx_falcon_h1.model"
    assert_close_logits(logits_of(model), reference_logits(torch_model, IDS))
    with pytest.raises(ValueError, match="trust_remote_code"):
        mlx_lm.utils.load_model(tmp_path / "mlx")

    cmd = [sys.executable, "-m", "mlx_lm", "generate", "--model", str(tmp_path / "mlx")]
    cmd += ["--trust-remote-code", "--prompt", "def if", "--max-tokens", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # (mlx-lm's statistics lines are its format, not ours)


def test_falcon_recipe_keeps_sensitive_layers_at_high_bits(source, tmp_path):
    path, _ = source
    convert(str(path), str(tmp_path / "m"), quantize=True, quant_predicate="falcon_mixed_3_6", q_group_size=32)
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization"]
    assert q["model.layers.1.mamba.in_proj"]["bits"] == 6 and q["lm_head"]["bits"] == 6
    assert "model.layers.0.feed_forward.down_proj" not in q  # input 80: no group of 32 fits
    assert q["model.layers.1.feed_forward.up_proj"]["bits"] == 3
    assert q["model.layers.1.mamba.out_proj"]["bits"] == 3
    ours = logits_of(load_model(tmp_path / "m")[0])
    assert_close_logits(logits_of(mlx_lm.utils.load_model(tmp_path / "m")[0]), ours, rel=1e-5)


# --- quantization settings: refused before anything is read ------------------------


def test_quantization_table_is_what_mx_quantize_takes():
    """The converter's Q_MODES against MLX itself: the modes mx.quantize documents, and
    per mode exactly the bits and group sizes it accepts and its defaults (an MLX that
    adds a mode or a width fails here, and the table gets the new entry)."""
    import re

    from mlx_falcon_h1_convert.convert import Q_MODES

    listed = re.search(r"supported quantization modes are(.*?)\.\s", mx.quantize.__doc__, re.S)
    assert listed, "mx.quantize's docstring no longer lists its modes; probe the names by hand"
    assert set(re.findall(r'"(\w+)"', listed.group(1))) == set(Q_MODES)
    width = 768  # divisible by every group size tried
    w = mx.ones((2, width))
    for mode, (bits, group_sizes, (default_bits, default_group_size)) in Q_MODES.items():
        taken = set()
        for b in range(1, 17):
            for g in (8, 16, 24, 32, 48, 64, 96, 128, 256):
                try:
                    mx.eval(mx.quantize(w, group_size=g, bits=b, mode=mode))
                except ValueError:
                    continue
                taken.add((b, g))
        assert taken == {(b, g) for b in bits for g in group_sizes}, mode
        packed, scales, *_ = mx.quantize(w, mode=mode)  # MLX's defaults, read off the shapes
        assert (packed.shape[-1] * 32 // width, width // scales.shape[-1]) == (default_bits, default_group_size)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(q_mode="mxfp4", q_bits=3), "--q-mode mxfp4 takes --q-bits 4 and --q-group-size 32, not --q-bits 3"),
        (dict(q_group_size=48), "--q-mode affine takes --q-bits 1, 2, 3, 4, 5, 6 or 8 and --q-group-size "
                                "32, 64 or 128, not --q-group-size 48"),
        (dict(q_mode="nvfp4", q_bits=8, q_group_size=32), "not --q-bits 8 and --q-group-size 32"),
        (dict(quant_predicate="mixed_3_6", q_mode="mxfp4"), "mixes affine bit widths; use --q-mode affine"),
        (dict(quant_predicate="falcon_mixed_3_6", q_group_size=16), "not --q-group-size 16"),
        (dict(method="gptq", q_bits=7), "not --q-bits 7"),
        (dict(method="dynamic", q_bits=8), "its high setting would be 9-bit g64; set --high-bits 1, 2"),
        (dict(method="dynamic", low_group_size=48), "its low setting would be 4-bit g48; set --low-bits"),
        (dict(method="dynamic", target_bpw=9.0), "--target-bpw 9 is outside [4.25, 5.5]"),
    ],
)  # fmt: skip
def test_impossible_quantization_is_refused_before_reading(tmp_path, flags, message):
    """Settings mx.quantize would refuse once every weight is in memory (minutes for a
    34B) are refused first: the source does not exist, so anything read would fail
    with another message; nothing is written."""
    import re

    with pytest.raises(ValueError, match=re.escape(message)):
        convert(str(tmp_path / "absent"), str(tmp_path / "out"), quantize=True, **flags)
    assert folder_state(tmp_path) == set()
