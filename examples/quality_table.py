"""The README's quality table: perplexity of the shipped model in every precision.

For a transformers checkpoint (default: the trained tiny model's fixture) on
held-out text (default: the shipped held-out set), measures the perplexity of
transformers in float32, of ours in float32 / bfloat16 / float16, and of every
quantization mode and bit width the converter offers, each as this package
computes it (SSM parameters, conv and norms in float32, whatever the folder
stores) and as stock mlx-lm computes the same folder (in bfloat16, the dtype
the converter stores them in). Also the KL divergence and top-1 agreement of
each against our float32 model.

    python examples/quality_table.py --json examples/quality_table.json
"""

import argparse
import json
import tempfile
from pathlib import Path

import mlx_falcon_h1  # noqa: F401  (picks the BLAS before mlx.core is imported)
import mlx_lm
from mlx_falcon_h1.evaluate import cast_model, compare, default_text_path, load_tokens, perplexity, torch_reference
from mlx_falcon_h1.loading import load, load_model
from mlx_falcon_h1_convert import convert

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "tiny_falcon_h1_hf"
QUANT = [
    ("affine 8-bit g64", dict(q_mode="affine", q_bits=8, q_group_size=64)),
    ("affine 6-bit g64", dict(q_mode="affine", q_bits=6, q_group_size=64)),
    ("affine 5-bit g64", dict(q_mode="affine", q_bits=5, q_group_size=64)),
    ("affine 4-bit g64", dict(q_mode="affine", q_bits=4, q_group_size=64)),
    ("affine 4-bit g32", dict(q_mode="affine", q_bits=4, q_group_size=32)),
    ("affine 3-bit g32", dict(q_mode="affine", q_bits=3, q_group_size=32)),
    ("affine 2-bit g32", dict(q_mode="affine", q_bits=2, q_group_size=32)),
    ("mxfp8", dict(q_mode="mxfp8")),
    ("mxfp4", dict(q_mode="mxfp4")),
    ("nvfp4", dict(q_mode="nvfp4")),
    ("mixed_3_6 (mlx-lm recipe)", dict(q_mode="affine", q_group_size=32, quant_predicate="mixed_3_6")),
    ("falcon_mixed_3_6 (our recipe)", dict(q_mode="affine", q_group_size=32, quant_predicate="falcon_mixed_3_6")),
    ("falcon_mixed_4_8 (our recipe)", dict(q_mode="affine", q_group_size=64, quant_predicate="falcon_mixed_4_8")),
]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", default=str(FIXTURE))
    p.add_argument("--text", default=None)
    p.add_argument("--max-tokens", type=int, default=20000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", default=None)
    a = p.parse_args()

    hf = Path(a.hf_path)
    text = Path(a.text).read_text() if a.text else default_text_path().read_text()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        convert(str(hf), str(tmp / "f32"), dtype="float32")
        reference, tokenizer = load(str(tmp / "f32"))
        tokens = load_tokens(tokenizer, text, a.max_tokens)

        def add(name, fn, size=None):
            stats = compare(fn, reference, tokens, seq_len=a.seq_len)
            rows.append({"name": name, "perplexity": stats["perplexity"], "kl": stats["kl"],
                         "top1_agreement": stats["top1_agreement"], "size_mb": size})  # fmt: skip
            print(f"{name:44s} ppl {stats['perplexity']:9.4f}  KL {stats['kl']:.5f}  "
                  f"top-1 {stats['top1_agreement']:.4f}  {'' if size is None else f'{size:.2f} MB'}")

        torch_model = torch_reference(hf)
        add("transformers float32", lambda ids: torch_model(ids))
        for dtype in ("float32", "bfloat16", "float16"):
            model, _ = load_model(tmp / "f32")
            add(f"ours {dtype}", cast_model(model, dtype))

        for name, settings in QUANT:
            out = tmp / f"q-{len(rows)}"
            convert(str(hf), str(out), quantize=True, dtype="bfloat16", **settings)
            size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
            add(f"{name}, ours (SSM/conv/norms float32)", load_model(out)[0], size)
            add(f"{name}, stock mlx-lm (SSM/conv/norms bf16)", mlx_lm.utils.load_model(out)[0], size)

    float_ppl = perplexity(reference, tokens, seq_len=a.seq_len)
    print(f"held-out tokens: {float_ppl['tokens']}")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "tokens": float_ppl["tokens"], "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
