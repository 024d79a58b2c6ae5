"""The folder layout of A_log, D, dt_bias, conv1d and the norms (issue 28).

Every MLX consumer but ours follows MLX's type promotion: float32 norm or SSM
parameters beside bfloat16 weights turn the residual stream float32, and every
matmul then casts its weights at every token. So a default conversion, and
--upgrade of a folder an earlier version wrote, store every floating tensor in
the weights' dtype, as mlx-lm's converter does; --ssm-dtype float32 keeps
today's layout when asked. Our loader widens those parameters to float32, so it
computes the same from either layout.
"""

import json
import os
import warnings
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

import published as P
from conftest import make_checkpoint, make_tokenizer
from mlx_falcon_h1 import folder_format, load, load_model
from mlx_falcon_h1.launch_count import decode_step_launches
from mlx_falcon_h1.parameter_dtypes import castable
from mlx_falcon_h1_convert import convert, upgrade
from mlx_falcon_h1_convert.convert import main
from mlx_falcon_h1_convert.writing import LAYOUT_LINES, OLD_LAYOUT_LINE

IDS = np.random.default_rng(5).integers(0, 96, size=(2, 40))
# mlx-lm's own conversion (published.make_folder) quantizes with group size 64.
SETTINGS = {"bf16": None, "8-bit": 8, "4-bit": 4}


def quantized(bits):
    return dict(quantize=True, q_bits=bits, q_group_size=64) if bits else {}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("layout")


@pytest.fixture(scope="module")
def bf16_source(work):
    """A random checkpoint saved in bfloat16, as TII's are (published.bf16_checkpoint)."""
    return P.bf16_checkpoint(work / "hf")


def converted(work: Path, source: Path, layout: str, setting: str) -> Path:
    """`source` converted once per module: layout "default" or "float32", a SETTINGS key."""
    out = work / f"{layout}-{setting}"
    if not out.exists():
        convert(str(source), str(out), report_tokens=8, ssm_dtype=None if layout == "default" else layout,
                **quantized(SETTINGS[setting]))  # fmt: skip
    return out


def tensors(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(mx.load(str(file)))
    return out


def floating_dtypes(folder: Path) -> dict:
    return {k: w.dtype for k, w in P.floating_tensors(folder).items()}


def logits(model) -> np.ndarray:
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def files(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir())}


def record(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())[folder_format.FORMAT_KEY]


@pytest.mark.parametrize("setting", SETTINGS)
def test_default_layout_is_mlx_lms_and_casts_nothing_in_stock_mlx_lm(work, bf16_source, setting):
    """Every floating tensor (norms, SSM parameters, conv, scales, biases) in the
    weights' dtype, as mlx-lm's converter writes the same checkpoint; stock
    mlx-lm's decode step launches no more kernels on it than on mlx-lm's own
    folder and casts no weight, and reads no more weight bytes per token; on the
    float32 layout it casts weights and launches more."""
    ours = converted(work, bf16_source, "default", setting)
    theirs = P.make_folder(bf16_source, work / f"mlx-lm-{setting}", "mlx-lm", SETTINGS[setting])
    assert set(floating_dtypes(ours).values()) == {mx.bfloat16}
    assert floating_dtypes(ours) == floating_dtypes(theirs)
    assert record(ours)["ssm_dtype"] == "weights" and record(ours)["ssm_dtype_chosen"] is False
    assert LAYOUT_LINES["weights"] in (ours / "README.md").read_text()

    # Stock mlx-lm's decode step as a Mac runs it (launch_count.py); the float32
    # layout is the control that the counter sees casts and extra launches.
    float32 = converted(work, bf16_source, "float32", setting)
    ours, theirs, float32 = (decode_step_launches(mlx_lm.utils.load_model(f)[0]) for f in (ours, theirs, float32))
    numbers = {name: {k: step[k] for k in ("per_layer", "weight_casts", "weight_bytes_read")}
               for name, step in (("ours", ours), ("mlx-lm's own", theirs), ("float32 layout", float32))}  # fmt: skip
    assert ours["per_layer"] <= theirs["per_layer"] < float32["per_layer"], numbers
    assert ours["weight_casts"] == 0 < float32["weight_casts"], (numbers, ours["cast_parameters"])
    assert ours["weight_bytes_read"] <= theirs["weight_bytes_read"] < float32["weight_bytes_read"], numbers


def test_float32_layout_is_a_choice_that_states_its_cost(bf16_source, tmp_path, capsys):
    out = tmp_path / "float32"
    convert(str(bf16_source), str(out), report_tokens=8, ssm_dtype="float32", **quantized(4))
    said = capsys.readouterr().out
    assert "[layout] --ssm-dtype float32" in said and "kernel launches instead of" in said
    for name, dtype in floating_dtypes(out).items():
        assert dtype == (mx.bfloat16 if castable(name) else mx.float32), name
    assert record(out)["ssm_dtype"] == "float32" and record(out)["ssm_dtype_chosen"] is True
    assert LAYOUT_LINES["float32"] in (out / "README.md").read_text()


def test_unknown_layout_is_refused(work, bf16_source):
    with pytest.raises(ValueError, match="'source': choose one of weights, float32"):
        convert(str(bf16_source), str(work / "never"), ssm_dtype="source")
    with pytest.raises(SystemExit):
        main(["--hf-path", str(bf16_source), "--mlx-path", str(work / "never"), "--ssm-dtype", "source"])


def test_ours_computes_the_same_from_either_layout(work, bf16_source, tmp_path):
    """Our loader widens the parameters, so the layouts differ only in their
    values' rounding: none from a bfloat16 checkpoint (bit-identical logits);
    from a float32 one, exactly that of rounding them to bfloat16."""
    for setting in ("bf16", "8-bit"):
        a, b = (converted(work, bf16_source, layout, setting) for layout in ("default", "float32"))
        assert np.array_equal(logits(load_model(a)[0]), logits(load_model(b)[0]))

    make_checkpoint(tmp_path / "hf")
    make_tokenizer(tmp_path / "hf")
    convert(str(tmp_path / "hf"), str(tmp_path / "default"), dtype="bfloat16")
    convert(str(tmp_path / "hf"), str(tmp_path / "float32"), dtype="bfloat16", ssm_dtype="float32")
    model = load_model(tmp_path / "float32")[0]
    exact = logits(model)
    rounded = [(k, w.astype(mx.bfloat16).astype(mx.float32))
               for k, w in tree_flatten(model.parameters()) if not castable(k)]  # fmt: skip
    model.update(tree_unflatten(rounded))
    assert np.array_equal(logits(load_model(tmp_path / "default")[0]), logits(model))
    assert not np.array_equal(logits(model), exact)  # the random norms were not bfloat16 values


def make_older_format(folder: Path, version: int) -> None:
    """What formats 1 and 2 wrote, from a folder converted with --ssm-dtype
    float32 (their layout): the record without ssm_dtype_chosen, their model
    card line; format 1 also restated the original multipliers in config.json."""
    file = folder / "config.json"
    config = json.loads(file.read_text())
    record = config[folder_format.FORMAT_KEY]
    record.pop("ssm_dtype_chosen")
    record["format_version"] = version
    if version == 1:
        config.update(record.pop("multipliers"))
    file.write_text(json.dumps(config, indent=4))
    card = folder / "README.md"
    card.write_text(card.read_text().replace(LAYOUT_LINES["float32"], OLD_LAYOUT_LINE))


@pytest.mark.parametrize("version", [2, 1])
def test_upgrade_brings_an_older_folder_to_the_default_in_place(bf16_source, tmp_path, version, capsys):
    folder = tmp_path / "mlx"
    convert(str(bf16_source), str(folder), report_tokens=8, ssm_dtype="float32", max_shard_size_gb=1e-4,
            **quantized(4))  # fmt: skip
    make_older_format(folder, version)
    before = files(folder)
    with pytest.warns(UserWarning, match="cast weights to float32 at every token"):
        expected = logits(load_model(folder)[0])

    assert upgrade(str(folder), dry_run=True) is True
    assert "[dry run]" in capsys.readouterr().out and files(folder) == before  # a dry run writes nothing

    assert upgrade(str(folder)) is True
    said = capsys.readouterr().out
    assert "to bfloat16" in said and "values unchanged" in said and "decode without casting weights" in said
    assert set(floating_dtypes(folder).values()) == {mx.bfloat16}
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(w.nbytes for w in tensors(folder).values())
    after = files(folder)
    assert after.keys() == before.keys()  # nothing left behind, nothing missing
    for name in ("tokenizer.json", "tokenizer_config.json", "quality_report.json"):
        assert after[name] == before[name], name
    old, new = (json.loads(f["config.json"]) for f in (before, after))
    rec = new.pop(folder_format.FORMAT_KEY)
    assert rec["format_version"] == 3 and rec["ssm_dtype"] == "weights" and rec["ssm_dtype_chosen"] is False
    if version == 2:
        assert new == {k: v for k, v in old.items() if k != folder_format.FORMAT_KEY}
    else:  # what the weights carry is no longer restated
        assert new["key_multiplier"] == 1.0 != old["key_multiplier"]
    card = after["README.md"].decode()
    assert LAYOUT_LINES["weights"] in card and OLD_LAYOUT_LINE not in card and "ssm_dtype: `weights`" in card

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert np.array_equal(logits(load_model(folder)[0]), expected)
    assert not [w for w in warned if "--upgrade" in str(w.message)]
    assert upgrade(str(folder)) is False and files(folder) == after  # idempotent


def test_upgrade_keeps_a_chosen_float32_layout_and_makes_one_when_asked(work, bf16_source, tmp_path, capsys):
    folder = P.copy_folder(converted(work, bf16_source, "default", "8-bit"), tmp_path / "mlx")
    main(["--upgrade", str(folder), "--ssm-dtype", "float32"])
    assert "as asked" in capsys.readouterr().out
    for name, dtype in floating_dtypes(folder).items():
        assert dtype == (mx.bfloat16 if castable(name) else mx.float32), name
    assert record(folder)["ssm_dtype"] == "float32" and record(folder)["ssm_dtype_chosen"] is True
    assert LAYOUT_LINES["float32"] in (folder / "README.md").read_text()
    chosen = files(folder)
    assert upgrade(str(folder)) is False and files(folder) == chosen  # a choice a plain --upgrade keeps
    assert upgrade(str(folder), ssm_dtype="weights") is True
    assert set(floating_dtypes(folder).values()) == {mx.bfloat16}
    with pytest.raises(ValueError, match="'f16': choose one of weights, float32"):
        upgrade(str(folder), ssm_dtype="f16")


def test_an_interrupted_upgrade_leaves_a_folder_that_runs_and_upgrade_finishes(work, bf16_source, tmp_path,
                                                                                monkeypatch):  # fmt: skip
    folder = tmp_path / "mlx"
    convert(str(bf16_source), str(folder), report_tokens=8, ssm_dtype="float32", max_shard_size_gb=1e-4)
    make_older_format(folder, 2)
    expected = logits(load_model(folder)[0])
    replace, calls = os.replace, []

    def fail_second(*args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError("disk full")
        replace(*args)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError, match="disk full"):
        upgrade(str(folder))
    monkeypatch.setattr(os, "replace", replace)
    assert not [f for f in folder.iterdir() if f.name.startswith(".")]
    assert record(folder)["format_version"] == 2  # config.json goes last
    assert np.array_equal(logits(load_model(folder)[0]), expected)  # one shard cast, one not: the same model
    assert upgrade(str(folder)) is True and set(floating_dtypes(folder).values()) == {mx.bfloat16}
    assert np.array_equal(logits(load_model(folder)[0]), expected)


@pytest.mark.parametrize("layout", ["default", "float32"])
def test_a_fused_model_keeps_its_bases_layout(work, bf16_source, tmp_path, layout):
    """The loader widens the parameters; python -m mlx_falcon_h1.fuse's save
    stores them as the base's record says."""
    from mlx_falcon_h1.lora import save

    base = converted(work, bf16_source, layout, "bf16")
    model, tokenizer, config = load(str(base), return_config=True, fuse=False)
    assert all(w.dtype == mx.float32 for k, w in tree_flatten(model.parameters()) if not castable(k))
    save(tmp_path / "fused", base, model, tokenizer, config)
    assert floating_dtypes(tmp_path / "fused") == floating_dtypes(base)
