"""A Mac speed model for single-stream decode: a PREDICTION, not a measurement.

    seconds per token = launches x t_launch + command buffers x t_buffer
                        + bytes read / bandwidth

`launches` are a decode step's kernel launches as launch_count counts them,
`bytes read` the weights a step reads plus its recurrent state (read and
written) and its K/V at the context length. Command buffers follow MLX's rule
(mlx/backend/metal/device.cpp, ml-explore/mlx at 846d1762, 2026-08-22; set in
#1864, commit 7aea5b18): a buffer is committed once it holds more than
max_ops_per_buffer dispatches or references more than max_mb_per_buffer MiB of
distinct inputs, and at the end of each step; per architecture letter 'g'
(base, Pro) 40 ops / 40 MB, 's' (Max) 50 / 50, 'd' (Ultra) 50 / 50. A step
needs at least as many buffers as either rule alone asks (command_buffers).

Published figures the constants come from (read, with where):
- t_buffer 20 us: ml-explore/mlx#4521 (2026-09-16, M3 Ultra, mlx 0.32.2): "Each
  boundary costs about 20 us of GPU time plus a completion handler on the CPU".
- t_launch: the same issue's synthetic chain of 3,200 tiny dependent kernels,
  8.8 ms per step at 50 ops per buffer and 7.7 ms at 200: 47 fewer buffers save
  1.1 ms (23 us each) and leave ~2.3 us per kernel; issue 23 of this project
  quotes 2.4-5 us per dispatch from it. T_LAUNCH_RANGE_S is that range; the
  model's t_launch is FITTED per chip (calibrate) and reported against it.
- Bandwidths: Apple's figures as the press reported them (CHIPS, each with its
  page). The model assumes a step streams its bytes at that peak.
- Calibration: mlx-lm 0.31.3 decoding Falcon-H1-Tiny-90M-Instruct-4bit at
  305.32 tok/s on an M1 Ultra and 520.13 on an M5 Max (pp512, tg128;
  lablup/mlxcel benchmarks/pylm_m1ultra_2026-09-06.csv at 1991bdc0,
  pylm_m5max_2026-09-06.csv at d6538755). calibrate() solves the model for
  t_launch at that figure, given mlx-lm's launch count for that config (counted
  with the mlx-lm installed here) and its bytes read.

t_launch is an effective cost: it lumps the GPU's dispatch cost with whatever
CPU time per op (building the graph in Python, encoding) the GPU is not hidden
behind. This module is arithmetic only; benchmark.mac_prediction counts the
launches and bytes and builds the table.
"""

import math
from dataclasses import dataclass
from typing import Dict, Optional

from mlx.utils import tree_flatten

T_BUFFER_S = 20e-6
T_LAUNCH_RANGE_S = (2.4e-6, 5e-6)
MIB = 1 << 20


@dataclass(frozen=True)
class Chip:
    bandwidth_gbps: float  # Apple's published unified-memory bandwidth
    max_ops_per_buffer: int  # MLX's default for the chip's architecture letter
    max_mb_per_buffer: int
    source: str


_M1_M2 = "https://www.macrumors.com/2022/10/24/macbook-pro-very-high-bandwidth-ram-rumor/ (M1 Pro 200, M1 Max 400)"
_M2 = ("https://neowin.net/amp/apple-unveils-next-generation-m2-pro-and-m2-max-chips-boosting-cpu-and-gpu-performance"
       " (M2 Pro 200, M2 Max 400)")  # fmt: skip
_ULTRA = ("https://github.com/antirez/ds4/pull/706 and /pull/902 (M1, M2 and M3 Ultra share 800 GB/s; "
          "https://gamebastion.com/n/apple-s-m4-max-is-the-first-non-ultra/474547: M1 Ultra 800)")  # fmt: skip
_M3 = "https://www.macrumors.com/2023/10/31/apple-m3-pro-less-memory-bandwidth/ (M3 Pro 150, M3 Max up to 400)"
_M4 = "https://www.macrumors.com/2024/10/30/apple-announces-m4-max-chip/ (M4 Max 546); M4 Pro 273: techbrunch.co"
_M5 = ("https://news.while1.co.il/article/33565624 (Apple's announcement: M5 Pro 307, M5 Max 614); "
       "M5 153: https://www.orva.online/the-professional-versions-of-apples-m5-chip-could-double-memory-bandwidth")  # fmt: skip
# Architecture letters for MLX's limits: Pro 'g', Max 's', Ultra 'd' (device.cpp's
# comments). M5 Pro / Max are two dies (Apple's "Fusion Architecture"): their letter is
# assumed to follow the same naming.
CHIPS: Dict[str, Chip] = {
    "M1 Pro": Chip(200, 40, 40, _M1_M2), "M1 Max": Chip(400, 50, 50, _M1_M2),
    "M1 Ultra": Chip(800, 50, 50, _ULTRA),
    "M2 Pro": Chip(200, 40, 40, _M2), "M2 Max": Chip(400, 50, 50, _M2), "M2 Ultra": Chip(800, 50, 50, _ULTRA),
    "M3 Pro": Chip(150, 40, 40, _M3), "M3 Max": Chip(400, 50, 50, _M3), "M3 Ultra": Chip(800, 50, 50, _ULTRA),
    "M4 Pro": Chip(273, 40, 40, _M4), "M4 Max": Chip(546, 50, 50, _M4),
    "M5": Chip(153, 40, 40, _M5), "M5 Pro": Chip(307, 40, 40, _M5), "M5 Max": Chip(614, 50, 50, _M5),
}  # fmt: skip


@dataclass(frozen=True)
class Published:
    chip: str
    tokens_per_s: float
    source: str


_MLXCEL = "https://github.com/lablup/mlxcel/blob/{}/benchmarks/{}"
# mlx-lm 0.31.3, mlx-community's Falcon-H1-Tiny-90M-Instruct-4bit, 512-token prompt, 128 decoded.
PUBLISHED = [
    Published("M1 Ultra", 305.32, _MLXCEL.format("1991bdc0f420da387ca77503e05025e7f50e8c0e",
                                                 "pylm_m1ultra_2026-09-06.csv")),
    Published("M5 Max", 520.13, _MLXCEL.format("d6538755b10639de8d2795189b4446e99a903feb",
                                               "pylm_m5max_2026-09-06.csv")),
]  # fmt: skip
PUBLISHED_CONTEXT = 512 + 64  # the prompt, and half the 128 decoded tokens

# Falcon-H1-Tiny-90M's shape (the published figure's model). Its config.json
# (huggingface.co/tiiuae/Falcon-H1-Tiny-90M-Instruct) is not stored here; the fields
# are as lablup/mlxcel's falcon_h1 config test carries them ("A trimmed
# Falcon-H1-Tiny-90M-Instruct-4bit config ... Values mirror the real checkpoint"),
# and intermediate_size 768 as a Falcon-H1-Tiny-90M converter requires it; 24
# layers, 8 heads / 2 KV, hidden 512 and vocab 32768 also as research notes cite
# the config.json. The muP multipliers are not needed to count (random weights).
TINY_90M = dict(
    model_type="falcon_h1", num_hidden_layers=24, hidden_size=512, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, mamba_n_heads=24, mamba_d_head=32, mamba_d_ssm=768,
    mamba_d_state=64, mamba_n_groups=1, mamba_d_conv=4, mamba_chunk_size=128, intermediate_size=768,
    vocab_size=32768, tie_word_embeddings=True, mamba_rms_norm=False, mamba_norm_before_gate=False,
    rope_theta=1e11, max_position_embeddings=262144,
)  # fmt: skip


def weight_bytes(model) -> int:
    return sum(w.nbytes for _, w in tree_flatten(model.parameters()))


def weight_bytes_read_per_token(model) -> int:
    """Weight bytes a decode step reads: all but the embedding table, of which
    it reads one row (unless the table is also the tied output head). Shapes
    only: a lazily built model is never evaluated."""
    table = weight_bytes(model.model.embed_tokens)  # with its scales if quantized
    return weight_bytes(model) - (0 if model.args.tie_word_embeddings else table)


def kv_bytes_per_value(itemsize: int, kv_bits: Optional[int] = None, group_size: int = 64) -> float:
    """Bytes of one K or V element: its float item size, or with --kv-bits the
    packed bits plus its share of its group's scale and bias (in the float dtype)."""
    return itemsize if kv_bits is None else kv_bits / 8 + 2 * itemsize / group_size


def state_bytes_per_token(config: dict, context: int, kv_itemsize: int, kv_bits: Optional[int] = None,
                          kv_group_size: int = 64, float_tokens: int = 0) -> int:
    """Cache bytes a decode step moves: the conv and SSM states read and written
    (SSM state float32, conv state at the K/V's item size) and every layer's K/V
    read at `context` tokens: with kv_bits, quantized but for the newest
    `float_tokens` (ours keep up to 256 in float while decoding: cache.py)."""
    layers = config["num_hidden_layers"]
    conv_channels = config["mamba_d_ssm"] + 2 * config["mamba_n_groups"] * config["mamba_d_state"]
    conv = (config["mamba_d_conv"] - 1) * conv_channels * kv_itemsize
    ssm = config["mamba_n_heads"] * config["mamba_d_head"] * config["mamba_d_state"] * 4
    float_tokens = 0 if kv_bits is None else min(float_tokens, context)
    per_token = (context - float_tokens) * kv_bytes_per_value(kv_itemsize, kv_bits, kv_group_size)
    kv = 2 * config["num_key_value_heads"] * config["head_dim"] * (per_token + float_tokens * kv_itemsize)
    return int(layers * (2 * (conv + ssm) + kv))


def command_buffers(launches: float, bytes_read: float, chip: Chip) -> int:
    """Command buffers per step: a buffer closes after max_ops + 1 dispatches or
    once its distinct inputs pass max_mb MiB; the step's end closes the last."""
    by_ops = math.ceil(launches / (chip.max_ops_per_buffer + 1))
    by_bytes = math.ceil(bytes_read / (chip.max_mb_per_buffer * MIB))
    return max(1, by_ops, by_bytes)


def seconds_per_token(launches: float, bytes_read: float, chip: Chip, t_launch: float,
                      t_buffer: float = T_BUFFER_S) -> float:  # fmt: skip
    buffers = command_buffers(launches, bytes_read, chip)
    return launches * t_launch + buffers * t_buffer + bytes_read / (chip.bandwidth_gbps * 1e9)


def predicted_tokens_per_s(launches: float, bytes_read: float, chip: Chip, t_launch: float,
                           t_buffer: float = T_BUFFER_S) -> float:  # fmt: skip
    """PREDICTED decode tokens/s (see the module's docstring for what it assumes)."""
    return 1.0 / seconds_per_token(launches, bytes_read, chip, t_launch, t_buffer)


def calibrate(tokens_per_s: float, launches: float, bytes_read: float, chip: Chip,
              t_buffer: float = T_BUFFER_S) -> float:  # fmt: skip
    """The t_launch at which the model gives `tokens_per_s` (a published figure)."""
    buffers = command_buffers(launches, bytes_read, chip)
    rest = 1.0 / tokens_per_s - buffers * t_buffer - bytes_read / (chip.bandwidth_gbps * 1e9)
    if rest <= 0:
        raise ValueError(f"{tokens_per_s} tok/s on the {chip}: buffers and bytes alone take longer")
    return rest / launches


def t_launch_band(fitted: Dict[str, float], chip: str) -> Optional[tuple]:
    """(low, high) t_launch for a chip: its own fit where it has one, else the
    band the fitted chips span (no published figure pins it down)."""
    if chip in fitted:
        return fitted[chip], fitted[chip]
    return (min(fitted.values()), max(fitted.values())) if fitted else None
