"""Falcon-H1 (TII) for MLX: every layer runs attention and a Mamba2 mixer in parallel.

Follows mlx-lm's model interface (ModelArgs, Model, sanitize, layers,
make_cache), so mlx-lm's generation, batching, server and tuner machinery work.
The math is stated in the project's falcon_h1_spec.md; the reference is
transformers' FalconH1ForCausalLM (modeling_falcon_h1.py), whose float32
logits this file reproduces.

Legend: B batch, L tokens, D hidden size, H SSM heads, P SSM head dim,
G groups, N state size, K conv width.

The muP multipliers are applied at run time, in the reference's order, from the
config. A checkpoint whose weights already carry them must say so by storing
1.0 for them (our converter does, and records the originals), so weights and
config can never disagree about what has been folded.
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import (
    BaseModelArgs,
    create_attention_mask,
    scaled_dot_product_attention,
)
from mlx_lm.models.rope_utils import initialize_rope

from . import blas
from .cache import MAX_ROLLBACK_TOKENS, FalconH1Cache
from .decode import compiled_decode
from .kernels.attention import causal_attention
from .kernels.conv1d import causal_conv1d
from .kernels.elementwise import silu, silu_gate
from .kernels.ssd_scan import ssd_scan
from .kernels.ssm_step import discretize, ssm_step


class ConfigError(ValueError):
    """A config.json that is not Falcon-H1 or whose sizes do not fit together."""


# The scalar muP multipliers (mlp_multipliers and ssm_multipliers are lists).
MULTIPLIERS = (
    "embedding_multiplier",
    "lm_head_multiplier",
    "key_multiplier",
    "attention_in_multiplier",
    "attention_out_multiplier",
    "ssm_in_multiplier",
    "ssm_out_multiplier",
)


@dataclass
class ModelArgs(BaseModelArgs):
    # Field names and defaults copy transformers' FalconH1Config, so a key
    # missing from config.json means what it means there.
    model_type: str = "falcon_h1"
    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False
    projectors_bias: bool = False
    rope_theta: Optional[float] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    rope_scaling: Optional[Dict[str, Any]] = None
    mamba_d_ssm: Optional[int] = 1024
    mamba_n_heads: int = 128
    mamba_d_head: Union[int, str] = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    time_step_limit: Optional[Sequence[float]] = (0.0, math.inf)
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    mlp_multipliers: List[float] = field(default_factory=lambda: [1.0, 1.0])
    ssm_multipliers: List[float] = field(default_factory=lambda: [1.0] * 5)
    # Written by our converter: what it did to the weights (see convert/).
    mlx_falcon_h1: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        def fail(message):
            raise ConfigError(f"config.json: {message}")

        if self.model_type != "falcon_h1":
            fail(f"model_type is {self.model_type!r}, expected 'falcon_h1'")
        if self.hidden_act != "silu":
            fail(f"hidden_act is {self.hidden_act!r}; Falcon-H1 uses 'silu'")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mamba_d_ssm is None:
            self.mamba_d_ssm = self.mamba_expand * self.hidden_size
        if self.mamba_d_head == "auto":
            if self.mamba_d_ssm % self.mamba_n_heads:
                fail(
                    f"mamba_n_heads = {self.mamba_n_heads} does not divide "
                    f"mamba_d_ssm = {self.mamba_d_ssm} (mamba_d_head is 'auto')"
                )
            self.mamba_d_head = self.mamba_d_ssm // self.mamba_n_heads
        if self.time_step_limit is None:
            self.time_step_limit = (0.0, math.inf)
        self.time_step_limit = tuple(float(t) for t in self.time_step_limit)
        self.rope_base, self.rope_scaling_config = self._resolve_rope()

        checks = [
            (
                self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_key_value_heads = {self.num_key_value_heads} does not divide "
                f"num_attention_heads = {self.num_attention_heads}",
            ),
            (self.head_dim % 2 == 0, f"head_dim = {self.head_dim} must be even (RoPE)"),
            (
                self.mamba_d_head * self.mamba_n_heads == self.mamba_d_ssm,
                f"mamba_d_head x mamba_n_heads = {self.mamba_d_head} x "
                f"{self.mamba_n_heads} != mamba_d_ssm = {self.mamba_d_ssm}",
            ),
            (
                self.mamba_n_heads % self.mamba_n_groups == 0,
                f"mamba_n_groups = {self.mamba_n_groups} does not divide "
                f"mamba_n_heads = {self.mamba_n_heads}",
            ),
            (self.mamba_d_conv >= 1, f"mamba_d_conv = {self.mamba_d_conv} must be >= 1"),
            (
                self.mamba_chunk_size >= 1,
                f"mamba_chunk_size = {self.mamba_chunk_size} must be >= 1",
            ),
            (
                len(self.mlp_multipliers) == 2,
                f"mlp_multipliers has {len(self.mlp_multipliers)} values, expected 2",
            ),
            (
                len(self.ssm_multipliers) == 5,
                f"ssm_multipliers has {len(self.ssm_multipliers)} values, expected 5 "
                "(z, x, B, C, dt)",
            ),
            (
                len(self.time_step_limit) == 2,
                f"time_step_limit = {list(self.time_step_limit)} must be [min, max]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                fail(message)
        record = self.mlx_falcon_h1 or {}
        if record.get("multipliers_folded") and record.get("format_version", 1) < 2:
            self._use_folded_multipliers()

    def _use_folded_multipliers(self):
        # Format 1 of our converter (folder_format.py) multiplied every muP
        # multiplier into the weights but kept the original values in the config,
        # so at run time they are 1. Tied embeddings share one matrix, which
        # carries the embedding multiplier; the head still needs lm_head /
        # embedding. Format 2 writes exactly these run-time values.
        head = self.lm_head_multiplier / self.embedding_multiplier
        for name in MULTIPLIERS:
            setattr(self, name, 1.0)
        self.mlp_multipliers = [1.0, 1.0]
        self.ssm_multipliers = [1.0] * 5
        if self.tie_word_embeddings:
            self.lm_head_multiplier = head

    def _resolve_rope(self):
        # transformers < 5 writes rope_theta (+ rope_scaling); transformers 5 writes
        # rope_parameters = {rope_theta, rope_type, ...}. Read both, never guess.
        params = self.rope_parameters or {}
        base = params.get("rope_theta", self.rope_theta)
        if self.rope_theta is not None and base != self.rope_theta:
            raise ConfigError(
                f"config.json: rope_theta = {self.rope_theta} disagrees with "
                f"rope_parameters.rope_theta = {params['rope_theta']}"
            )
        scaling = self.rope_scaling
        if params.get("rope_type", "default") != "default":
            scaling = params
        return (10000.0 if base is None else float(base)), scaling

    @property
    def conv_dim(self) -> int:
        return self.mamba_d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state


def _scaled(x: mx.array, multiplier: float) -> mx.array:
    # Skip the op for the common 1.0 (and for checkpoints with folded multipliers).
    return x if multiplier == 1.0 else x * multiplier


# Decode-sized inputs (at most this many rows) take the mat-vec form below, in
# blocks of output rows of about _MATVEC_BLOCK_BYTES, alternating between the
# current stream and a second CPU stream, so the two cores stream the weights
# side by side. Measured on the project's 2-core Linux machine (its memory reads
# ~26 GB/s on one core, ~30 on two), 768 MB of 4096 x 1024 matrices: whole
# matrices 14 GB/s, 1024-row blocks on one stream 15.8, 512-row (2 MB) blocks on
# two streams 23.8 (4 MB blocks: 15.4, OpenBLAS then threads each call itself).
_MATVEC_ROWS = 4
_MATVEC_BLOCK_BYTES = 1 << 21
_SECOND_STREAM = mx.new_thread_local_stream(mx.cpu)  # each thread (server) gets its own


def _linear(layer: nn.Module, x: mx.array) -> mx.array:
    """layer(x); on the CPU a float32 nn.Linear with a few rows runs as W @ x^T.

    Decode streams the weights once per token. For 1-4 rows, an optimized BLAS's
    mat-vec on ~2 MB row blocks spread over two streams reads them ~1.7x faster
    than MLX's x @ W^T does (see above). Quantized and LoRA layers, other
    dtypes, the GPU and the bundled BLAS call the layer.
    """
    rows = x.size // x.shape[-1]
    if (
        rows > _MATVEC_ROWS
        or type(layer) is not nn.Linear
        or layer.weight.dtype != mx.float32
        or x.dtype != mx.float32
        or mx.default_device() != mx.cpu
        # With mlx[cpu]'s bundled reference BLAS this form is 2.3x slower than
        # MLX's own (0.5B decode: 0.97 vs 2.19 tok/s); it pays with OpenBLAS.
        or not blas.optimized()
    ):
        return layer(x)
    w = layer.weight
    # v is (D, rows), 2-D: a 1-D vector costs an expand and a squeeze per block.
    v = x.reshape(-1, 1) if rows == 1 else x.reshape(rows, -1).T
    block = max(64, _MATVEC_BLOCK_BYTES // (4 * w.shape[1]))
    y = [
        mx.matmul(w[i : i + block], v, stream=_SECOND_STREAM if n % 2 else None)
        for n, i in enumerate(range(0, w.shape[0], block))
    ]
    y = y[0] if len(y) == 1 else mx.concatenate(y, axis=0)
    y = (y if rows == 1 else y.T).reshape(*x.shape[:-1], -1)
    return y + layer.bias if "bias" in layer else y


class GatedRMSNorm(nn.Module):
    """RMSNorm over groups of d_ssm / G channels, combined with the SiLU gate.

    norm_before_gate: w * RMS_g(y) * SiLU(z); otherwise w * RMS_g(y * SiLU(z)).
    Statistics per group, not over all of d_ssm (they differ when G > 1).
    """

    def __init__(self, dims: int, groups: int, eps: float, norm_before_gate: bool):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.groups = groups
        self.eps = eps
        self.norm_before_gate = norm_before_gate

    def __call__(self, y: mx.array, gate: mx.array) -> mx.array:
        # y, gate: (B, L, d_ssm); computed in float32 like the reference.
        gate = silu(gate.astype(mx.float32))
        y = y.astype(mx.float32)
        if not self.norm_before_gate:
            y = y * gate
        shape = y.shape
        y = mx.fast.rms_norm(y.reshape(*shape[:-1], self.groups, -1), None, self.eps)
        y = (self.weight.astype(mx.float32).reshape(self.groups, -1) * y).reshape(shape)
        return y * gate if self.norm_before_gate else y


class RoPE(nn.Module):
    """nn.RoPE (rotate half) with the frequencies computed once in float64.

    mx.fast.rope derives base^(-2i/D) as 2^(-2i/D * log2(base)) in float32: at
    Falcon-H1's base of 1e11 that is ~16 float32 ulps off, and at position 262,143
    angles go up to 0.011 rad wrong (tests/test_long_context.py); transformers'
    float32 pow is within an ulp. Given the frequencies, the angles are float32's
    best (position x frequency rounded once)."""

    def __init__(self, dims: int, base: float, scale: float = 1.0):
        super().__init__()
        self.dims, self.base, self.scale = dims, base, scale
        # Underscored: not a parameter (not saved, loaded, cast or quantized).
        self._freqs = mx.array(base ** (np.arange(0, dims, 2, dtype=np.float64) / dims), mx.float32)

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=self.scale,
                            offset=offset, freqs=self._freqs)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.key_multiplier = args.key_multiplier
        bias = args.attention_bias
        D = args.hidden_size
        self.q_proj = nn.Linear(D, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, D, bias=bias)
        # Non-interleaved ("rotate half") RoPE over the full head_dim.
        self.rope = initialize_rope(
            self.head_dim,
            args.rope_base,
            traditional=False,
            scaling_config=args.rope_scaling_config,
            max_position_embeddings=args.max_position_embeddings,
        )
        if type(self.rope) is nn.RoPE:  # no scaling, or linear: frequencies of our own
            self.rope = RoPE(self.rope.dims, self.rope.base, self.rope.scale)

    def __call__(self, x: mx.array, mask, cache: Optional[FalconH1Cache]) -> mx.array:
        b, l, _ = x.shape
        q = _linear(self.q_proj, x).reshape(b, l, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = _scaled(_linear(self.k_proj, x), self.key_multiplier)
        k = k.reshape(b, l, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = _linear(self.v_proj, x).reshape(b, l, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        # One RoPE call for q and k (heads are independent): on the CPU RoPE is a
        # chain of ~20 small ops, which a decode step pays per call.
        q, k = mx.split(self.rope(mx.concatenate([q, k], axis=1), offset=offset), [self.n_heads], axis=1)
        valid = None
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
            if l == 1 and (buffers := cache.whole_buffers()) is not None:
                k, v, valid = buffers
        causal = mask is None and l == 1 or isinstance(mask, str) and mask == "causal"
        if causal and not hasattr(cache, "bits"):
            out = causal_attention(q, k, v, self.scale, valid)  # blocked, or one query
        else:  # a mask array (batch padding) or a quantized cache (whole buffers: `valid`)
            mask = mask if valid is None else valid
            out = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return _linear(self.o_proj, out.transpose(0, 2, 1, 3).reshape(b, l, -1))


class Mixer(nn.Module):
    """The Mamba2 mixer: in_proj -> causal conv -> SSM -> gate/norm -> out_proj."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.d_ssm = args.mamba_d_ssm
        self.n_heads = args.mamba_n_heads
        self.head_dim = args.mamba_d_head
        self.n_groups = args.mamba_n_groups
        self.d_state = args.mamba_d_state
        self.chunk_size = args.mamba_chunk_size
        self.time_step_limit = args.time_step_limit
        self.conv_width = args.mamba_d_conv
        self.ssm_in_multiplier = args.ssm_in_multiplier
        conv_dim = args.conv_dim
        # in_proj output rows: z (d_ssm) | x (d_ssm) | B (G*N) | C (G*N) | dt (H)
        self.in_proj = nn.Linear(
            args.hidden_size, self.d_ssm + conv_dim + self.n_heads, bias=args.mamba_proj_bias
        )
        sizes = [self.d_ssm, self.d_ssm, self.n_groups * self.d_state]
        sizes += [self.n_groups * self.d_state, self.n_heads]
        self._mup = (
            None
            if all(m == 1.0 for m in args.ssm_multipliers)
            else mx.concatenate(
                [mx.full((s,), m, dtype=mx.float32) for s, m in zip(sizes, args.ssm_multipliers)]
            )
        )
        # Depthwise conv; weight (conv_dim, K, 1) as in mlx-lm's Conv1d layout.
        self.conv1d = nn.Conv1d(
            conv_dim, conv_dim, args.mamba_d_conv, groups=conv_dim, bias=args.mamba_conv_bias
        )
        self.dt_bias = mx.ones((self.n_heads,))
        self.A_log = mx.zeros((self.n_heads,))
        self.D = mx.ones((self.n_heads,))
        if args.mamba_rms_norm:
            self.norm = GatedRMSNorm(
                self.d_ssm, self.n_groups, args.rms_norm_eps, args.mamba_norm_before_gate
            )
        self.out_proj = nn.Linear(self.d_ssm, args.hidden_size, bias=args.projectors_bias)

    def __call__(self, u: mx.array, cache: Optional[FalconH1Cache]) -> mx.array:
        b, l, _ = u.shape
        zxbcdt = _linear(self.in_proj, _scaled(u, self.ssm_in_multiplier))
        if self._mup is not None:
            zxbcdt = zxbcdt * self._mup.astype(zxbcdt.dtype)
        z, xBC_dt = mx.split(zxbcdt, [self.d_ssm], axis=-1)
        xBC, dt = mx.split(xBC_dt, [xBC_dt.shape[-1] - self.n_heads], axis=-1)

        if cache is None:
            y, _, _ = self.ssm(xBC, dt, None, None)
        else:  # keeps state and the rollback window (of raw [xBC | dt] rows)
            y = cache.run_mixer(self, xBC, dt, xBC_dt)
        y = y.reshape(b, l, self.d_ssm)  # float32
        if "norm" in self:
            y = self.norm(y, z)
        else:
            y = silu_gate(z.astype(mx.float32), y)
        return _linear(self.out_proj, y.astype(u.dtype))

    def ssm(self, xBC, dt, conv_state, ssm_state, lengths=None):
        """Conv and SSM over L new tokens, continuing from the given states.

        xBC: (B, L, C) and dt: (B, L, H), raw in_proj outputs. conv_state:
        (B, K-1, C) or None; ssm_state: (B, H, P, N) float32 or None (empty).
        lengths: (B,) real tokens per row of a right-padded batch, or None; the
        padding leaves both states as they were at each row's last real token.
        Returns y (B, L, H, P) float32, the new conv state and the new SSM state.
        """
        b, l, _ = xBC.shape
        conv_weight, conv_bias = self.conv1d.weight[:, :, 0], self.conv1d.get("bias")
        if l == 1 and ssm_state is not None and lengths is None:
            y, conv_state, ssm_state = ssm_step(
                xBC[:, 0], dt[:, 0], conv_state, conv_weight, conv_bias,
                self.dt_bias, self.A_log, self.D, ssm_state,
                self.time_step_limit, self.n_groups,
            )  # fmt: skip
            return y[:, None], conv_state, ssm_state

        xBC_raw = xBC
        xBC, new_conv_state = causal_conv1d(xBC, conv_weight, conv_bias, conv_state)
        gn = self.n_groups * self.d_state
        x, B, C = mx.split(xBC, [self.d_ssm, self.d_ssm + gn], axis=-1)
        dt, A = discretize(dt, self.dt_bias, self.A_log, self.time_step_limit)
        if lengths is not None:
            # dt = 0 is an exact no-op step (no decay, no input) for padded positions.
            dt = mx.where((mx.arange(l) < lengths[:, None])[..., None], dt, 0.0)
            new_conv_state = _conv_state_at(xBC_raw, conv_state, lengths, self.conv_width)
        y, ssm_state = ssd_scan(
            x.reshape(b, l, self.n_heads, self.head_dim),
            dt,
            A,
            B.reshape(b, l, self.n_groups, self.d_state),
            C.reshape(b, l, self.n_groups, self.d_state),
            self.D,
            ssm_state,
            min(self.chunk_size, l),  # a short call (replay, prompt tail) needs no padding
        )
        return y, new_conv_state, ssm_state


def _conv_state_at(xBC, conv_state, lengths, width):
    """The K-1 raw conv inputs ending at each row's last real token."""
    if conv_state is None:
        conv_state = mx.zeros((xBC.shape[0], width - 1, xBC.shape[-1]), xBC.dtype)
    padded = mx.concatenate([conv_state, xBC], axis=1)  # (B, K-1+L, C)
    ends = mx.clip(lengths, 0, xBC.shape[1])
    rows = ends[:, None] + mx.arange(width - 1)  # padded index of the K-1 inputs
    return mx.take_along_axis(padded, rows[..., None], axis=1)


class MLP(nn.Module):
    """SwiGLU: down(up(x) * SiLU(gate(x) * m0)) * m1."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, F, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(D, F, bias=bias)
        self.up_proj = nn.Linear(D, F, bias=bias)
        self.down_proj = nn.Linear(F, D, bias=bias)
        self.gate_multiplier, self.down_multiplier = args.mlp_multipliers

    def __call__(self, x: mx.array) -> mx.array:
        up = _linear(self.up_proj, x)
        h = silu_gate(_scaled(_linear(self.gate_proj, x), self.gate_multiplier), up)
        return _scaled(_linear(self.down_proj, h), self.down_multiplier)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mamba = Mixer(args)
        self.self_attn = Attention(args)
        self.pre_ff_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.feed_forward = MLP(args)
        self.attention_in_multiplier = args.attention_in_multiplier
        self.attention_out_multiplier = args.attention_out_multiplier
        self.ssm_out_multiplier = args.ssm_out_multiplier

    def __call__(self, h: mx.array, mask, cache: Optional[FalconH1Cache]) -> mx.array:
        n = self.input_layernorm(h)  # one norm feeds both branches
        m = _scaled(self.mamba(n, cache), self.ssm_out_multiplier)
        a = self.self_attn(_scaled(n, self.attention_in_multiplier), mask, cache)
        h = h + (m + _scaled(a, self.attention_out_multiplier))
        return h + self.feed_forward(self.pre_ff_layernorm(h))


class FalconH1Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embedding_multiplier = args.embedding_multiplier
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.final_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = _scaled(self.embed_tokens(inputs), self.embedding_multiplier)
        if cache is None:
            cache = [None] * len(self.layers)
        elif len(cache) != len(self.layers):  # zip would run the first layers only
            raise ValueError(
                f"a cache of {len(cache)} layers for a model of {len(self.layers)}: "
                "it was made for another model (a prompt-cache file?)"
            )
        mask = create_attention_mask(h, cache[0])
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.final_layernorm(h)


# SSM parameters, conv and norms stay in float32 when weights are cast (and are
# never quantized): parameter names containing any of these.
FLOAT32_PARAMETERS = ("A_log", "mamba.D", "dt_bias", "conv1d", "norm")


def castable(name: str) -> bool:
    """Whether parameter `name` takes the target dtype when the weights are cast
    (the one rule: our converter, mlx-lm's, evaluation and the memory planner);
    the rest stay float32."""
    return not any(k in name for k in FLOAT32_PARAMETERS)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = FalconH1Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """inputs: (B, L) token ids -> (B, L, vocab) logits."""
        step = compiled_decode(self) if inputs.shape[1] == 1 else None
        if step is not None and step.eligible(cache, len(self.layers)):
            return step(self, inputs, cache)  # the same forward, traced once (decode.py)
        return self.forward(inputs, cache)

    def forward(self, inputs: mx.array, cache=None) -> mx.array:
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = _linear(self.lm_head, h)
        return _scaled(logits, self.args.lm_head_multiplier)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map a Hugging Face checkpoint's tensors onto this model. Idempotent."""
        out = {}
        for name, w in weights.items():
            if self.args.tie_word_embeddings and name == "lm_head.weight":
                continue  # some tied checkpoints store the shared matrix twice
            if name.endswith("mamba.conv1d.weight") and w.ndim == 3 and w.shape[-1] != 1:
                w = w.swapaxes(1, 2)  # HF (C, 1, K) -> MLX (C, K, 1)
            out[name] = w
        return out

    def shard(self, group=None):
        """Tensor parallelism over `group` (mlx-lm's interface); see sharding.py."""
        from .sharding import shard

        return shard(self, group)

    def pipeline(self, group=None, split=None):
        """Keep only this rank's layers of a pipeline over `group`; see sharding.py."""
        from .sharding import pipeline

        return pipeline(self, group, split)

    # Tokens any cache from make_cache() can be trimmed by (see cache.py).
    rollback_tokens = MAX_ROLLBACK_TOKENS
    # The attention window of caches made without an explicit max_kv_size (the
    # server's --max-kv-size sets it); None: attention sees the whole context.
    max_kv_size: Optional[int] = None

    def make_cache(self, max_kv_size: Optional[int] = None) -> List[FalconH1Cache]:
        """One cache per layer; max_kv_size bounds each layer's attention K/V
        (mlx-lm's --max-kv-size), leaving the conv and SSM state whole."""
        window = self.max_kv_size if max_kv_size is None else max_kv_size
        return [FalconH1Cache(self.rollback_tokens, window) for _ in self.layers]

    @property
    def layers(self):
        return self.model.layers

    @property
    def cast_predicate(self):
        return castable  # mlx-lm's hook (mlx_lm.convert reads it)
