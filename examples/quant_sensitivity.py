"""Which Falcon-H1 layers suffer most from quantization? Measured, one class at a time.

Converts a Hugging Face checkpoint to float MLX weights with our converter, then
for each class of quantizable layer (embedding, lm_head, q/k/v/o, in_proj,
out_proj, gate/up/down) quantizes only that class and measures, on held-out
text, the mean KL divergence from the float model. The classes with the largest
KL are the ones the converter's Falcon recipes keep at higher precision.

    python examples/quant_sensitivity.py --hf-path tests/fixtures/tiny_falcon_h1_hf \\
        --bits 3 --json sensitivity.json
"""

import argparse
import json
import tempfile
from pathlib import Path

import mlx.nn as nn

from mlx_falcon_h1.evaluate import cast_model, compare, default_text_path, load_tokens
from mlx_falcon_h1.loading import load, load_model
from mlx_falcon_h1_convert import convert

CLASSES = [
    "embed_tokens", "lm_head", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
    "self_attn.o_proj", "mamba.in_proj", "mamba.out_proj", "feed_forward.gate_proj",
    "feed_forward.up_proj", "feed_forward.down_proj",
]  # fmt: skip


def sensitivity(hf_path, bits, group_size, mode, max_tokens, seq_len):
    with tempfile.TemporaryDirectory() as tmp:
        float_path = Path(tmp) / "float"
        convert(str(hf_path), str(float_path), dtype="float32")
        reference, tokenizer = load(str(float_path))
        tokens = load_tokens(tokenizer, default_text_path().read_text(), max_tokens)
        rows = []
        for cls in CLASSES + ["all"]:
            model, _ = load_model(float_path)
            cast_model(model, "float32")

            def only(path, module, cls=cls):
                fits = hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0
                return fits and (cls == "all" or path.endswith(cls))

            nn.quantize(model, group_size=group_size, bits=bits, mode=mode, class_predicate=only)
            stats = compare(model, reference, tokens, seq_len=seq_len)
            rows.append({"class": cls, **stats})
            print(f"{cls:24s} KL {stats['kl']:.5f}  top-1 {stats['top1_agreement']:.4f}  "
                  f"ppl {stats['perplexity']:.3f} (float {stats['reference_perplexity']:.3f})")  # fmt: skip
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hf-path", required=True)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--mode", default="affine")
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    rows = sensitivity(a.hf_path, a.bits, a.group_size, a.mode, a.max_tokens, a.seq_len)
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
