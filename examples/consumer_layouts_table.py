"""Every folder layout in every consumer (issue 28): decode cost and quality.

Layouts: mlx-lm's own conversion (`mlx_lm.convert`), ours in the default layout
(tests/published.py DEFAULT_LAYOUT: every parameter in the weights' dtype) and
ours with the SSM parameters, conv1d and norms in float32 (FLOAT32_LAYOUT).
Settings: bfloat16, 8-bit and 4-bit (group size 64), and our calibrated methods
at 4-bit (mlx-lm's converter has none: compare with its plain 4-bit).
Sources: the trained fixture (bfloat16) over held-out text and the random
bfloat16 checkpoints of tests/published.py over random ids. Consumers: this
package, stock mlx-lm (installed, for real), and the models of mlx-lm main /
LM Studio's mlx-engine and of mlx-swift-lm (tests/consumers.py).

Per folder and consumer: launches per decode layer (a step's launches / layers,
counted as on a Mac: mlx_falcon_h1/launch_count.py), weight casts per step,
weight bytes read per token (launch_count.weight_traffic says what it counts)
and mean KL(transformers || consumer), nats. With --shapes, the same counts
for released shapes, and the Mac speed model's PREDICTED decode tok/s
(mlx_falcon_h1/mac_speed_model.py, calibrated as examples/mac_decode_prediction.py
is); a prediction, not a measurement.

    python examples/consumer_layouts_table.py [--tokens 1024] [--shapes 0.5B 7B] [--out ...json]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import mlx_falcon_h1  # noqa: E402,F401  (first: picks MLX's BLAS on Linux)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import published as P  # noqa: E402
from consumers import CONSUMERS, CannotLoad, step_model  # noqa: E402
from mlx_falcon_h1 import benchmark, mac_speed_model  # noqa: E402
from mlx_falcon_h1.evaluate import torch_reference  # noqa: E402
from mlx_falcon_h1.fused_projections import fuse_projections  # noqa: E402
from mlx_falcon_h1.launch_count import decode_step_launches, our_decode_step  # noqa: E402
from mlx_falcon_h1.released_shapes import RELEASED  # noqa: E402

OURS = "mlx_falcon_h1 (here)"
LAYOUTS = {"mlx-lm's own": None, "ours default": P.DEFAULT_LAYOUT, "ours float32": P.FLOAT32_LAYOUT}
# Calibration shortened from the defaults (64 windows of 256 tokens, AWQ searching
# 20 ratios) to keep the 32 calibrated conversions near a quarter of an hour on
# two cores; the JSON records it.
CALIBRATION = dict(num_samples=16, sequence_length=128, n_grid=5)
# setting -> (bits, calibration); None bits: bfloat16.
SETTINGS = {
    "bf16": (None, {}), "8-bit": (8, {}), "4-bit": (4, {}),
    **{f"4-bit {m}": (4, dict(method=m, **CALIBRATION)) for m in ("gptq", "awq", "dwq", "dynamic")},
}  # fmt: skip
MAC_SETTINGS = ("bf16", "8-bit", "4-bit")
PREDICTION_CHIPS = ("M1 Ultra", "M3 Max", "M4 Max", "M5 Max")
SHORT = {OURS: "ours", "mlx-lm (installed)": "stock mlx-lm", "mlx-lm main d78bf58 / mlx-engine 08f0c07":
         "mlx-lm main / mlx-engine", "mlx-swift-lm 14414441": "mlx-swift-lm"}  # table headers


def consumers():
    return {OURS: P.ours, **CONSUMERS}


def folder_for(source: Path, work: Path, layout: str, setting: str):
    """The folder `layout` makes of `source` at `setting`; None where that maker has no such setting."""
    bits, calibration = SETTINGS[setting]
    out = work / f"{source.name}-{layout.replace(' ', '_')}-{setting.replace(' ', '_')}".replace("'", "")
    if LAYOUTS[layout] is None:
        return None if calibration else P.make_folder(source, out, "mlx-lm", bits)
    return P.our_folder(source, out, LAYOUTS[layout], bits, **calibration)


def load(consumer: str, folder: Path, told):
    """`consumer`'s model of `folder`; ours as load() gives it to generation (projections fused)."""
    if consumer == OURS:
        model = P.ours(folder, model_config=told)
        fuse_projections(model)
        return model
    return CONSUMERS[consumer](folder)


def step_counts(consumer: str, model) -> dict:
    if consumer == OURS:
        c = decode_step_launches(model, our_decode_step)
    else:
        c = decode_step_launches(step_model(model))
    return {"launches_per_layer": c["per_layer"], "launches": c["total"], "layers": len(step_model(model).layers),
            "weight_casts": c["weight_casts"], "weight_bytes_read": c["weight_bytes_read"]}  # fmt: skip


def memoized(reference):
    """transformers' logits, once per batch of ids (every folder of a source is compared on the same)."""
    seen = {}

    def run(ids):
        key = np.asarray(ids).tobytes()
        if key not in seen:
            seen[key] = reference(ids)
        return seen[key]

    return run


def rows_for(name: str, source: Path, work: Path, reference, ids, seq_len: int) -> list:
    rows = []
    for setting in SETTINGS:
        for layout in LAYOUTS:
            try:
                folder = folder_for(source, work, layout, setting)
            except ValueError as e:  # a converter that refuses (or fails on) this source: say so
                rows.append(dict(source=name, setting=setting, layout=layout, cannot_convert=str(e)[:160]))
                print(json.dumps(rows[-1]), flush=True)
                continue
            if folder is None:
                continue
            # Random ids tell our loader nothing about who made a folder: say it (published_folders_table.py).
            told = {"source_format": "mlx-lm"} if name != "trained" and LAYOUTS[layout] is None else None
            for consumer in consumers():
                row = dict(source=name, setting=setting, layout=layout, consumer=consumer)
                try:
                    model = load(consumer, folder, told)
                except (CannotLoad, ValueError) as e:
                    rows.append({**row, "cannot_load": str(e)[:160]})
                    continue
                row.update(step_counts(consumer, model))
                row["kl"] = round(P.mean_kl(model, reference, ids, seq_len), 7)
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model
            mx.clear_cache()
    return rows


def kl_checks(rows: list) -> list:
    """The issue's bar: in every consumer, our default folder's KL at most mlx-lm's
    own conversion's at the same bits. One line per (source, setting, consumer)."""
    kl = {(r["source"], r["setting"], r["layout"], r["consumer"]): r.get("kl") for r in rows if "consumer" in r}
    out = []
    for (source, setting, layout, consumer), ours in kl.items():
        if layout != "ours default":
            continue
        bits = SETTINGS[setting][0]
        plain = next(s for s, (b, c) in SETTINGS.items() if b == bits and not c)
        theirs = kl.get((source, plain, "mlx-lm's own", consumer))
        ok = ours is not None and (theirs is None or ours <= theirs)
        out.append(dict(source=source, setting=setting, consumer=consumer, ours_default=ours,
                        mlx_lm_own=theirs, at_most=ok))  # fmt: skip
    return out


# Released shapes: counted on 1- and 2-layer checkpoints of the shape's widths
# (every count is linear in the layers), and at two vocabularies (bytes are
# linear in it: the head is read whole, the embedding one row), then extended to
# the shape's layers and vocabulary. Launches do not depend on the vocabulary.
COUNT_VOCABS = (1024, 2048)


def released_counts(shape: str, work: Path) -> list:
    config = {k: v for k, v in RELEASED[shape].items() if k != "model_type"}
    counts = {}  # (layers, vocab) -> {(layout, setting, consumer): step_counts}
    for layers, vocab in ((1, COUNT_VOCABS[0]), (2, COUNT_VOCABS[0]), (1, COUNT_VOCABS[1])):
        variant = work / f"{shape}-{layers}L-{vocab}"
        source = P.bf16_checkpoint(variant / "hf", **dict(config, num_hidden_layers=layers, vocab_size=vocab))
        counts[layers, vocab] = {}
        for setting in MAC_SETTINGS:
            for layout in LAYOUTS:
                folder = folder_for(source, variant, layout, setting)
                told = {"source_format": "mlx-lm"} if LAYOUTS[layout] is None else None
                for consumer in consumers():
                    try:
                        model = load(consumer, folder, told)
                    except (CannotLoad, ValueError):
                        continue
                    counts[layers, vocab][layout, setting, consumer] = step_counts(consumer, model)
                    del model
                shutil.rmtree(folder)
                mx.clear_cache()
        shutil.rmtree(variant)
    rows = []
    (v1, v2), layers = COUNT_VOCABS, config["num_hidden_layers"]
    state = mac_speed_model.state_bytes_per_token(config, mac_speed_model.PUBLISHED_CONTEXT, 2)
    for key, one in counts[1, v1].items():
        two, wide = counts[2, v1].get(key), counts[1, v2].get(key)
        if two is None or wide is None:
            continue
        per_layer = {m: two[m] - one[m] for m in ("launches", "weight_casts", "weight_bytes_read")}
        per_vocab = (wide["weight_bytes_read"] - one["weight_bytes_read"]) / (v2 - v1)
        at = {m: one[m] + per_layer[m] * (layers - 1) for m in ("launches", "weight_casts")}
        weights = one["weight_bytes_read"] + per_layer["weight_bytes_read"] * (layers - 1)
        weights += per_vocab * (config["vocab_size"] - v1)
        layout, setting, consumer = key
        rows.append(dict(shape=shape, setting=setting, layout=layout, consumer=consumer, layers=layers,
                         launches_per_layer=per_layer["launches"], launches_per_token=at["launches"],
                         weight_casts=at["weight_casts"], weight_bytes_read=int(weights),
                         bytes_per_token=int(weights) + state))  # fmt: skip
    return rows


def predict(rows: list, cache_dir: Path) -> dict:
    """Each row's PREDICTED tok/s per chip, at the t_launch fitted to mlx-lm's
    published Tiny-90M figures (benchmark.mac_prediction's calibration)."""
    calibration = benchmark.mac_prediction(cache_dir, shapes=["Tiny-90M"])["calibration"]
    fitted = {c["chip"]: c["fitted_t_launch_us"] * 1e-6 for c in calibration}
    for row in rows:
        row["predicted_tps"] = {}
        for chip in PREDICTION_CHIPS:
            band = sorted(set(mac_speed_model.t_launch_band(fitted, chip)))
            row["predicted_tps"][chip] = sorted(round(mac_speed_model.predicted_tokens_per_s(
                row["launches_per_token"], row["bytes_per_token"], mac_speed_model.CHIPS[chip], t), 1)
                for t in band)  # fmt: skip
    return {"calibration": calibration, "fitted_t_launch_us": {k: v * 1e6 for k, v in fitted.items()}}


def print_tables(result: dict) -> None:
    names = list(consumers())
    short = {n: SHORT.get(n, n) for n in names}
    by = {(r["source"], r["setting"], r["layout"], r.get("consumer")): r for r in result["rows"]}
    keys = list(dict.fromkeys((r["source"], r["setting"], r["layout"]) for r in result["rows"]))

    def cell(r, what):
        if r is None:
            return ""
        if "cannot_convert" in r:
            return "conversion failed"
        if "cannot_load" in r:
            return "cannot load"
        if what == "cost":
            return f"{r['launches_per_layer']:g} / {r['weight_casts']} / {r['weight_bytes_read'] / 1024:.0f}"
        return f"{r['kl']:.3g}"

    for what, title in (("cost", "launches per decode layer / weight casts per step / weight KiB read per token"),
                        ("kl", "mean KL(transformers || consumer), nats")):  # fmt: skip
        print(f"\n{title}\n")
        header = ["source", "setting", "layout"] + [short[n] for n in names]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for key in keys:
            print("| " + " | ".join(list(key) + [cell(by.get(key + (n,), by.get(key + (None,))), what)
                                                 for n in names]) + " |")  # fmt: skip
    failed = [c for c in result["kl_checks"] if not c["at_most"]]
    print(f"\nour default folder's KL <= mlx-lm's own at the same bits: "
          f"{len(result['kl_checks']) - len(failed)} of {len(result['kl_checks'])} (source, setting, consumer)")
    for c in failed:
        print(f"  above: {c}")
    for r in result["rows"]:
        if "cannot_convert" in r:
            print(f"  conversion failed: {r['source']} {r['setting']} {r['layout']}: {r['cannot_convert']}")
    if result.get("released"):
        print("\nReleased shapes, PREDICTED Mac decode tok/s (a model, not a measurement), context "
              f"{mac_speed_model.PUBLISHED_CONTEXT}; launches/layer, launches/token, weight casts/step, MB/token\n")
        header = ["shape", "setting", "layout", "consumer", "launches/layer", "launches/token", "casts/step",
                  "MB/token"] + list(PREDICTION_CHIPS)  # fmt: skip
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for r in result["released"]["rows"]:
            tps = ["-".join(f"{v:.0f}" for v in dict.fromkeys(r["predicted_tps"][c])) for c in PREDICTION_CHIPS]
            print("| " + " | ".join([r["shape"], r["setting"], r["layout"], short[r["consumer"]],
                                     f"{r['launches_per_layer']:g}", f"{r['launches_per_token']:g}",
                                     str(r["weight_casts"]), f"{r['bytes_per_token'] / 1e6:.0f}"] + tps) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024, help="Held-out tokens for the trained fixture.")
    p.add_argument("--shapes", nargs="*", default=["0.5B", "7B"], help="Released shapes to predict (none: skip).")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "consumer_layouts_table.json")
    p.add_argument("--work", type=Path, default=None,
                   help="Keep the converted folders here (a rerun reuses them); default: a temporary folder.")
    args = p.parse_args()
    started = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        ids = P.heldout_ids(args.tokens + 1)
        rows += rows_for("trained", P.FIXTURE, work, memoized(torch_reference(P.FIXTURE)), ids, 256)
        random_ids = np.random.default_rng(3).integers(0, 96, size=257)
        for name, overrides in P.RANDOM_CASES.items():
            source = P.bf16_checkpoint(work / f"hf-{name}", **overrides)
            rows += rows_for(name, source, work, memoized(torch_reference(source)), random_ids, 256)
        table_s = time.time() - started
        released = None
        if args.shapes:
            released = {"rows": [r for shape in args.shapes for r in released_counts(shape, work / "released")]}
            released.update(predict(released["rows"], work / "mac"))
    result = {
        "what": "per folder layout x setting x source x consumer: launches per decode layer (a step's launches / "
                "layers, as on a Mac: mlx_falcon_h1/launch_count.py), weight casts per step, weight bytes read "
                "per token (launch_count.weight_traffic), mean KL(transformers || consumer) in nats",
        "layouts": dict(LAYOUTS), "calibration": CALIBRATION,
        "tokens": {"trained": args.tokens, "random": 256},
        "mlx": mx.__version__, "mlx_lm": __import__("mlx_lm").__version__,
        "consumers": list(consumers()), "rows": rows, "kl_checks": kl_checks(rows),
        "released": released, "seconds": {"table": round(table_s), "all": round(time.time() - started)},
    }  # fmt: skip
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print_tables(result)
    print(f"\nwrote {args.out} in {result['seconds']['all']} s")


if __name__ == "__main__":
    main()
