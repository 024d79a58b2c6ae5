"""The released Falcon-H1 shapes: the memory planner plans them, the benchmark
builds random models of them.

Sources: the table in transformers' FalconH1 docs (layers, D, heads, KV heads,
H, P, N, context: https://huggingface.co/docs/transformers/model_doc/falcon_h1)
and each model's config.json on the Hub (groups, intermediate size, vocabulary,
the gated norm: https://huggingface.co/tiiuae/Falcon-H1-<size>-Instruct/blob/main/config.json).
Where neither gives a field, the value is an assumption, listed in ASSUMED: it
changes only the weights (never the K/V or the SSM state).
"""

from typing import Dict

# Falcon-H1R-7B has the 7B's shape (README, tests/test_kernels_released_shapes.py).
# Falcon-H1-Tiny is left out: neither source above gives its shape.
_COMMON = dict(model_type="falcon_h1", mamba_d_conv=4, mamba_chunk_size=128, rope_theta=1e11)
RELEASED: Dict[str, dict] = {
    "0.5B": dict(num_hidden_layers=36, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=64, mamba_n_heads=24, mamba_d_head=64, mamba_d_ssm=1536, mamba_d_state=128,
                 mamba_n_groups=1, intermediate_size=2048, vocab_size=32784,
                 max_position_embeddings=16384),
    "1.5B": dict(num_hidden_layers=24, hidden_size=2048, num_attention_heads=8, num_key_value_heads=2,
                 head_dim=128, mamba_n_heads=48, mamba_d_head=64, mamba_d_ssm=3072, mamba_d_state=256,
                 mamba_n_groups=1, intermediate_size=4096, vocab_size=65537,
                 max_position_embeddings=131072),
    "1.5B-Deep": dict(num_hidden_layers=66, hidden_size=1280, num_attention_heads=6, num_key_value_heads=2,
                      head_dim=128, mamba_n_heads=24, mamba_d_head=64, mamba_d_ssm=1536, mamba_d_state=256,
                      mamba_n_groups=1, intermediate_size=3072, vocab_size=65537, mamba_rms_norm=True,
                      max_position_embeddings=131072),
    "3B": dict(num_hidden_layers=32, hidden_size=2560, num_attention_heads=10, num_key_value_heads=2,
               head_dim=128, mamba_n_heads=32, mamba_d_head=128, mamba_d_ssm=4096, mamba_d_state=256,
               mamba_n_groups=1, intermediate_size=5120, vocab_size=65537,
               max_position_embeddings=131072),
    "7B": dict(num_hidden_layers=44, hidden_size=3072, num_attention_heads=12, num_key_value_heads=2,
               head_dim=128, mamba_n_heads=24, mamba_d_head=128, mamba_d_ssm=3072, mamba_d_state=256,
               mamba_n_groups=1, intermediate_size=12288, vocab_size=130048, mamba_rms_norm=True,
               max_position_embeddings=262144),
    "34B": dict(num_hidden_layers=72, hidden_size=5120, num_attention_heads=20, num_key_value_heads=4,
                head_dim=128, mamba_n_heads=32, mamba_d_head=128, mamba_d_ssm=4096, mamba_d_state=256,
                mamba_n_groups=2, intermediate_size=21504, vocab_size=261120, mamba_rms_norm=True,
                max_position_embeddings=262144),
}  # fmt: skip
ASSUMED = {
    "1.5B": "intermediate_size 4096 (2 x D) and vocab 65537 assumed (not in the docs table)",
    "3B": "intermediate_size 5120 (2 x D), vocab 65537 and mamba_n_groups 1 assumed (not in the docs table)",
}
for _config in RELEASED.values():
    for _key, _value in _COMMON.items():
        _config.setdefault(_key, _value)

