"""Each kernel at the exact mixer shape of every released Falcon-H1, in the emulator.

(H heads, P head dim, N state size, G groups, K conv width), bfloat16 as the
checkpoints ship. Sources (read, not downloaded):
- H, P, N of 0.5B .. 34B: the table in transformers' FalconH1 docs
  (huggingface.co/docs/transformers/model_doc/falcon_h1: "Mamba Heads",
  "d_head" second value, "d_state"); G and K from config.json where found:
  0.5B's (mamba_n_groups 1, mamba_d_conv 4, via a published derivative's
  config.json), 34B's G = 2 from its config.json on the Hub
  (huggingface.co/tiiuae/Falcon-H1-34B-Instruct/blob/main/config.json).
  G = 1 and K = 4 for 1.5B, 1.5B-Deep, 3B and 7B from their config.json on the
  Hub likewise (3B's G was not confirmed: assumed 1).
- Falcon-H1R-7B: 44 layers, 12/2 attention heads of 128 and Falcon-H1-7B's
  config keys (a third-party import report of its config.json); its mixer is
  taken as 7B's.
- Falcon-H1-Tiny (90M family): no config.json was found in the searchable
  index. The row below is a stand-in (small P and N, several groups), not the
  released values; replace it when the real config is at hand.

Prefill runs 33 tokens (one full 32-token kernel chunk and a one-token
remainder, so the state is carried between chunks in registers at each N),
except 1.5B and 3B: 9 tokens, as they share P, N and G with 1.5B-Deep and 7B
(only more heads), whose 33 tokens cover the carry; the conv 33 tokens (two
16-token blocks and a remainder); decode one token.
mixer_step runs each model's norm: 1.5B-Deep, 7B and 34B have the gated RMSNorm
(mamba_rms_norm, released_shapes.py) with mamba_norm_before_gate's default
(True); the others none; and again as the fused projections call it, with the
attention's output (query heads x head dim) as its prefix and muP-like scales. rope_qk runs each model's attention heads (query and
key heads, head dim: released_shapes.py; Tiny's a stand-in likewise) over the
33 tokens, at positions up to 200,000. residual_rms_norm runs each model's
hidden size D (released_shapes.py; Tiny's stand-in 256) over 33 rows, with a
bfloat16 residual, float32 norm weights and a bfloat16 output, as a bfloat16
model's layers call it. quantized_decode_attention runs each model's attention
heads over a --kv-bits cache's default quantization (4 bits, group 64): a bulk
of 300 real keys in 512 and a float tail of 37 in 256. Every released head dim
is 64 or 128; the shipped default model's 48 (no MLX group size divides it)
cannot be quantized at all, so --kv-bits never reaches this op there.
One thread schedule, race tracking off for the scan (the per-kernel grids check
races and schedules at these P and N; this file checks the exact sizes).
"""

import mlx.core as mx
import pytest

from mlx_falcon_h1 import msl_emu
from mlx_falcon_h1.kernels import (conv1d, gated_norm, mixer_step, quantized_attention, residual_norm,
                                   rope, runtime_check, ssd_scan, ssm_step)
from mlx_falcon_h1.msl_emu.testing import emulated
from mlx_falcon_h1.released_shapes import RELEASED as CONFIGS

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

# name: (H, P, N, G, K)
RELEASED = {
    "0.5B": (24, 64, 128, 1, 4),
    "1.5B": (48, 64, 256, 1, 4),
    "1.5B-Deep": (24, 64, 256, 1, 4),
    "3B": (32, 128, 256, 1, 4),
    "7B+H1R-7B": (24, 128, 256, 1, 4),
    "34B": (32, 128, 256, 2, 4),
    "Tiny-standin": (16, 32, 64, 2, 4),
}
SHORT_PREFILL = ("1.5B", "3B")  # see above: the emulator spends ~6 s per chunk at these sizes
DTYPE = mx.bfloat16  # every released checkpoint's torch_dtype
# name: (query heads, key heads, head dim) of the attention
ATTENTION = {"0.5B": (8, 2, 64), "1.5B": (8, 2, 128), "1.5B-Deep": (6, 2, 128), "3B": (10, 2, 128),
             "7B+H1R-7B": (12, 2, 128), "34B": (20, 4, 128), "Tiny-standin": (4, 2, 64)}
NORMED = ("1.5B-Deep", "7B+H1R-7B", "34B")
# name: the hidden size D (H1R-7B's is 7B's)
HIDDEN = {name: CONFIGS[name.split("+")[0]]["hidden_size"] for name in RELEASED
          if name.split("+")[0] in CONFIGS} | {"Tiny-standin": 256}
MODULES = {"ssd_scan": ssd_scan, "causal_conv1d": conv1d, "ssm_step": ssm_step,
           "mixer_step": mixer_step, "rope_qk": rope, "residual_rms_norm": residual_norm,
           "quantized_decode_attention": quantized_attention}
OPTIONS = {"ssd_scan": dict(schedules=("forward",), track_races=False),
           "causal_conv1d": dict(schedules=("forward",)),
           "ssm_step": dict(schedules=("forward",)),
           "mixer_step": dict(schedules=("forward",)),
           "rope_qk": dict(schedules=("forward",)),
           "residual_rms_norm": dict(schedules=("forward",)),
           "quantized_decode_attention": dict(schedules=("forward",))}


def sizes_for(op, model, h, p, n, g, k):
    if op == "residual_rms_norm":
        return dict(dim=HIDDEN[model], dtype=DTYPE, delta=DTYPE, wdtype=mx.float32,
                    out_dtype=DTYPE)
    if op == "rope_qk":
        heads, kv_heads, head_dim = ATTENTION[model]
        return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, dtype=DTYPE)
    if op == "quantized_decode_attention":
        heads, kv_heads, head_dim = ATTENTION[model]
        return dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, bits=4, group_size=64,
                    dtype=DTYPE, bulk_capacity=512, bulk_len=300, tail_capacity=256, tail_len=37)
    if op == "mixer_step":
        return dict(heads=h, head_dim=p, groups=g, n=n, width=k, dtype=DTYPE, wdtype=mx.float32,
                    norm="norm_first" if model in NORMED else "none")
    if op == "causal_conv1d":
        return dict(channels=h * p + 2 * g * n, width=k, dtype=DTYPE, wdtype=mx.float32)
    if op == "ssd_scan":
        return dict(heads=h, head_dim=p, groups=g, n=n, dtype=DTYPE)
    return dict(heads=h, head_dim=p, groups=g, n=n, width=k, dtype=DTYPE, wdtype=mx.float32)


@pytest.mark.parametrize("op", list(MODULES))
@pytest.mark.parametrize("model", list(RELEASED))
def test_released_shape(model, op):
    module = MODULES[op]
    length = 9 if op == "ssd_scan" and model in SHORT_PREFILL else 33
    inputs = runtime_check.check_inputs(op, sizes_for(op, model, *RELEASED[model]), length=length)
    followers = [gated_norm] if op == "mixer_step" else []  # the norm's kernel after the step's
    with emulated(module, *followers, **OPTIONS[op]) as (kernel, *norm_kernel):
        ours = getattr(module, op)(**inputs)  # the dispatcher, as the model calls it
        mx.eval(ours)
        assert kernel.last, f"{op} did not take the kernel at {model}'s shape"
        assert all(bool(k.last) == (model in NORMED) for k in norm_kernel)
    ref = getattr(module, op + "_reference")(**inputs)
    rel = runtime_check.relative_error(ours, ref)
    assert rel <= runtime_check.TOLERANCE[(op, DTYPE)], (model, op, rel)
    if op in ("causal_conv1d", "ssm_step", "mixer_step"):  # the new conv state: data movement, exact
        assert mx.array_equal(ours[1], ref[1]).item()
    if op == "residual_rms_norm":  # the residual sum: one rounding in both, exact
        assert mx.array_equal(ours[0], ref[0]).item()


@pytest.mark.parametrize("model", list(RELEASED))
def test_released_shape_mixer_step_with_prefix(model):
    """out_proj's fused input [attention's output * s_a | mixer output * s_m]."""
    heads, _, head_dim = ATTENTION[model]
    n_prefix = heads * head_dim
    sizes = dict(sizes_for("mixer_step", model, *RELEASED[model]), prefix=n_prefix)
    inputs = runtime_check.check_inputs("mixer_step", sizes)
    with emulated(mixer_step, gated_norm, **OPTIONS["mixer_step"]) as (kernel, norm_kernel):
        ours = mixer_step.mixer_step(**inputs)
        mx.eval(ours)
        assert kernel.last, f"mixer_step did not take the kernel at {model}'s shape"
        assert bool(norm_kernel.last) == (model in NORMED)
    ref = mixer_step.mixer_step_reference(**inputs)
    assert ours[0].shape == (1, n_prefix + RELEASED[model][0] * RELEASED[model][1])
    assert mx.array_equal(ours[0][:, :n_prefix], ref[0][:, :n_prefix]).item()
    tolerance = runtime_check.TOLERANCE[("mixer_step", DTYPE)]
    rel = runtime_check.relative_error([ours[0][:, n_prefix:]], [ref[0][:, n_prefix:]])
    assert rel <= tolerance, (model, rel)
    assert runtime_check.relative_error(ours, ref) <= tolerance
    assert mx.array_equal(ours[1], ref[1]).item()


@pytest.mark.parametrize("model", NORMED)
@pytest.mark.parametrize("norm_before_gate", [True, False])
def test_released_shape_gated_norm(model, norm_before_gate):
    """The norm's own kernel at each normed shape: d = H*P channels in G groups, the
    mixer step's float32 output, the gate (norm first) in bfloat16, the attention's
    output as the prefix; out_proj's whole input in bfloat16."""
    h, p, _, g, _ = RELEASED[model]
    heads, _, head_dim = ATTENTION[model]
    sizes = dict(dim=h * p, groups=g, dtype=mx.float32, gate=DTYPE if norm_before_gate else None,
                 wdtype=mx.float32, out_dtype=DTYPE, prefix=heads * head_dim, prefix_dtype=DTYPE)
    inputs = runtime_check.check_inputs("gated_norm", sizes)
    with emulated(gated_norm, schedules=("forward",)) as (kernel,):
        ours = gated_norm.gated_norm(**inputs)
        mx.eval(ours)
        assert kernel.last, f"gated_norm did not take the kernel at {model}'s shape"
    ref = gated_norm.gated_norm_reference(**inputs)
    n_prefix = heads * head_dim
    assert mx.array_equal(ours[:, :n_prefix], ref[:, :n_prefix]).item()
    rel = runtime_check.relative_error([ours[:, n_prefix:]], [ref[:, n_prefix:]])
    assert rel <= runtime_check.TOLERANCE[("gated_norm", DTYPE)], (model, rel)
