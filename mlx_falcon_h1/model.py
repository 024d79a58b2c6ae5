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
config can never disagree about what has been folded (folder_format.py).

With a cache, each layer's mixer and attention read their state from it and
write the new state into it; the cache (cache.py) keeps the books. One-token
calls may run as one compiled step over the same layer code (decode.py). For
generation, load() fuses each layer's projections (fused_projections.py); a
layer runs either layout.
"""

from typing import Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.rope_utils import initialize_rope

from . import parallel
from .cache import MAX_ROLLBACK_TOKENS, FalconH1Cache, LayerCache, check_cache_length, check_fits, mixer_sizes
from .config import ModelArgs  # noqa: F401  (mlx-lm reads a model module's ModelArgs)
from .decode import decode_step
from .fused_projections import fused_layer, unfuse_projections
from .kernels.attention import causal_attention
from .kernels.conv1d import causal_conv1d, conv_state_at
from .kernels.elementwise import silu_gate
from .kernels.gated_norm import gated_rms_norm, with_prefix
from .kernels.mixer_step import mixer_step
from .kernels.residual_norm import residual_rms_norm
from .kernels.rope import rope_qk
from .kernels.ssd_scan import ssd_scan
from .kernels.ssm_step import discretize, ssm_step
from .linear import linear
from .parameter_dtypes import with_float32_parameters
from .quantized_kv import quantized_kv_attention


def _scaled(x: mx.array, multiplier: float) -> mx.array:
    # Skip the op for the common 1.0 (and for checkpoints with folded multipliers).
    return x if multiplier == 1.0 else x * multiplier


def activation_dtype(h: mx.array, norm_weight: mx.array) -> mx.Dtype:
    """The dtype a norm hands the projections. On a GPU, the residual stream's (the
    embedding's: bfloat16 in a bf16 model), as in mlx-lm: our norms keep float32
    weights, and a float32 input would make every matmul cast its bfloat16 weights
    (or quantized scales) to float32 at each call, a launch and several times the
    bytes. On the CPU, the promoted dtype (float32 there): only float32 matmuls
    reach BLAS, bfloat16 ones run ~10x slower."""
    return mx.result_type(h, norm_weight) if mx.default_device() == mx.cpu else h.dtype


def add_and_norm(norm: nn.RMSNorm, h: mx.array, delta: Optional[mx.array]):
    """(h + delta, norm(h + delta)): a residual add and the next norm, one kernel on
    a Mac (kernels/residual_norm.py); delta None: h and its norm."""
    return residual_rms_norm(h, delta, norm.weight, norm.eps, activation_dtype(h, norm.weight))


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
        return gated_rms_norm(y, gate, self.weight, self.groups, self.eps, self.norm_before_gate)


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

    def __call__(self, x: mx.array, mask, cache: Optional[LayerCache]) -> mx.array:
        return linear(self.o_proj, self.attend(*self.project(x), mask, cache))

    def project(self, x: mx.array):
        """q and k side by side (B, L, (Hq + Hkv) * head_dim), and v (B, L, Hkv * head_dim)."""
        k = _scaled(linear(self.k_proj, x), self.key_multiplier)
        return mx.concatenate([linear(self.q_proj, x), k], axis=-1), linear(self.v_proj, x)

    def attend(self, qk: mx.array, v: mx.array, mask, cache: Optional[LayerCache]) -> mx.array:
        """Attention over project()'s outputs (or the fused projection's, fused_projections.py):
        (B, L, Hq * head_dim), before o_proj."""
        b, l, _ = qk.shape
        qk = qk.reshape(b, l, -1, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(b, l, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        # One RoPE call for q and k (heads are independent): on the CPU RoPE is a
        # chain of ~20 small ops, which a decode step pays per call.
        if type(self.rope) is RoPE and self.rope.dims == self.head_dim:  # one kernel on Metal
            q, k = rope_qk(qk[:, : self.n_heads], qk[:, self.n_heads :], offset, self.rope._freqs, self.rope.scale)
        else:
            q, k = mx.split(self.rope(qk, offset=offset), [self.n_heads], axis=1)
        real = None  # reading whole K/V buffers: which positions hold keys (cache.py)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
            if l == 1 and (buffers := cache.whole_buffers()) is not None:
                k, v, real = buffers
        bits = None if cache is None else cache.bits  # --kv-bits: a quantized K/V (quantized_kv.py)
        causal = mask is None and l == 1 or isinstance(mask, str) and mask == "causal"
        if bits is not None:
            out = quantized_kv_attention(q, k, v, real, mask, self.scale, cache.group_size, bits)
        elif causal:
            out = causal_attention(q, k, v, self.scale, real)  # blocked, or one query
        else:  # a mask array (batch padding; whole buffers are read by one causal query only)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(b, l, -1)


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

    def __call__(self, u: mx.array, cache: Optional[LayerCache]) -> mx.array:
        return linear(self.out_proj, self.mix(self.project(u), cache, u.dtype))

    def project(self, u: mx.array) -> mx.array:
        """in_proj's output with the muP multipliers: z | x | B | C | dt, (B, L, 2 d_ssm + 2GN + H)."""
        zxbcdt = linear(self.in_proj, _scaled(u, self.ssm_in_multiplier))
        return zxbcdt if self._mup is None else zxbcdt * self._mup.astype(zxbcdt.dtype)

    def mix(self, zxbcdt: mx.array, cache: Optional[LayerCache], dtype, prefix=None,
            prefix_scale: float = 1.0, out_scale: float = 1.0) -> mx.array:
        """Conv, SSM, gate and norm over project()'s output (or the fused projection's
        part of it): (B, L, d_ssm) in `dtype`, before out_proj. With a prefix (the
        fused [o_proj | out_proj]'s input, fused_projections.py): [prefix *
        prefix_scale ; out * out_scale], which the decode step's kernel writes itself."""
        b, l, _ = zxbcdt.shape
        z, xBC_dt = mx.split(zxbcdt, [self.d_ssm], axis=-1)
        xBC, dt = mx.split(xBC_dt, [xBC_dt.shape[-1] - self.n_heads], axis=-1)
        scales = dict(prefix=prefix if prefix is None else prefix[:, 0], prefix_scale=prefix_scale,
                      out_scale=out_scale)
        if cache is None:
            y, _, _ = self.conv_and_scan(xBC, dt, None, None)
        elif (out := self._decode_step(xBC, dt, z, xBC_dt, cache, dtype, scales)) is not None:
            return out
        else:
            y = self._conv_and_scan_cached(xBC, dt, xBC_dt, cache)
        y = y.reshape(b, l, self.d_ssm)  # float32
        y = self.norm(y, z) if "norm" in self else silu_gate(z.astype(mx.float32), y)
        return with_prefix(y, prefix, prefix_scale, out_scale).astype(dtype)  # as mixer_step joins them

    def _decode_step(self, xBC, dt, z, rows, cache: LayerCache, dtype, scales) -> Optional[mx.array]:
        """One token from a cache with state as one step (mixer_step): mix's output;
        None for any other call (_conv_and_scan_cached's, keeping rollback inputs)."""
        norm = self.get("norm")
        if (xBC.shape[1] != 1 or cache.lengths is not None or cache.conv_state is None
                or cache.ssm_state is None or cache.rollback_split(1)):
            return None
        if norm is not None and (type(norm) is not GatedRMSNorm or norm.groups != self.n_groups):
            return None  # a tensor-parallel rank's norm (parallel.py): statistics across ranks
        cache.keep_rollback_inputs(rows)
        out, cache.conv_state, cache.ssm_state = mixer_step(
            xBC[:, 0], dt[:, 0], z[:, 0], cache.conv_state, self.conv1d.weight[:, :, 0],
            self.conv1d.get("bias"), self.dt_bias, self.A_log, self.D, cache.ssm_state,
            None if norm is None else norm.weight, self.time_step_limit, self.n_groups,
            0.0 if norm is None else norm.eps, norm is not None and norm.norm_before_gate, dtype,
            **scales)
        return out[:, None]

    def _conv_and_scan_cached(self, xBC, dt, rows, cache: LayerCache) -> mx.array:
        """conv_and_scan from the cache's state, which gets the new state; the cache
        keeps this call's raw rows [xBC | dt] (B, L, C + H) as rollback inputs."""
        length = xBC.shape[1]
        if cache.lengths is not None:  # right-padded batch prompts: no rollback inputs kept
            y, cache.conv_state, cache.ssm_state = self.conv_and_scan(
                xBC, dt, cache.conv_state, cache.ssm_state, cache.lengths)
            cache.end_padded_call(length)
            return cache.with_state(y)
        if cache.conv_state is None:
            cache.conv_state = mx.zeros((xBC.shape[0], self.conv_width - 1, xBC.shape[-1]), xBC.dtype)
        # The scan is split where states come out of it: the rollback window's start
        # (a call longer than the window: a prompt) and planned checkpoints.
        window, ys, start = cache.rollback_split(length), [], 0
        for end in cache.scan_cuts(length):
            if start == window:
                if window:
                    cache.restart_rollback_window()
                cache.keep_rollback_inputs(rows[:, window:])
            y, cache.conv_state, cache.ssm_state = self.conv_and_scan(
                xBC[:, start:end], dt[:, start:end], cache.conv_state, cache.ssm_state)
            cache.keep_checkpoint(end)
            ys.append(y)
            start = end
        # A few tokens: their inputs are small, nothing worth computing early.
        return ys[0] if len(ys) == 1 else cache.with_state(mx.concatenate(ys, axis=1))

    def prepare(self, cache: FalconH1Cache, length: int) -> None:
        """Before a call of `length` tokens: check a cache loaded from a file against
        this layer, and compute what the cache keeps only the inputs for: the SSM
        state after a rollback (trim), and the rollback window's new start state
        when this call would overflow the window."""
        if cache.unverified_mixer:
            check_fits(cache, mixer_sizes(self), "this model")
        cache.begin_call()
        if cache.replay_to is not None:
            cache.ssm_state = self._replay(cache, cache.replay_to)
            cache.replay_to = None
        if drop := cache.rollback_overflow(length):
            cache.drop_rollback_inputs(drop, self._replay(cache, drop))

    def _replay(self, cache: FalconH1Cache, tokens: int) -> Optional[mx.array]:
        """The SSM state after the rollback window's first `tokens` tokens."""
        if tokens == 0:
            return cache.rollback_start_state
        xBC, dt, conv_context = cache.replay_inputs(tokens)
        return self.conv_and_scan(xBC, dt, conv_context, cache.rollback_start_state)[2]

    def conv_and_scan(self, xBC, dt, conv_state, ssm_state, lengths=None):
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
            new_conv_state = conv_state_at(xBC_raw, conv_state, lengths, self.conv_width)
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
        return _scaled(linear(self.down_proj, self.hidden(x)), self.down_multiplier)

    def hidden(self, x: mx.array) -> mx.array:
        """down_proj's input: up(x) * SiLU(gate(x) * m0)."""
        if "gate_up" in self:  # one matmul for both (fused_projections.py)
            gate, up = mx.split(self.gate_up(x), 2, axis=-1)
        else:
            gate, up = linear(self.gate_proj, x), linear(self.up_proj, x)
        return silu_gate(_scaled(gate, self.gate_multiplier), up)


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

    def __call__(self, h: mx.array, mask, cache: Optional[LayerCache]) -> mx.array:
        h, delta = self.forward(h, None, mask, cache)
        return h + delta

    def forward(self, h: mx.array, delta: Optional[mx.array], mask, cache: Optional[LayerCache]):
        """The layer over the residual stream h + delta (delta: the previous layer's
        MLP output, or None); returns the new (h, delta). Each residual add is done
        by the norm that follows it (add_and_norm), the last by the final norm."""
        h, n = add_and_norm(self.input_layernorm, h, delta)  # one norm feeds both branches
        if "fused_in" in self or "fused_out" in self:
            y = fused_layer(self, n, mask, cache)  # the same layer, 4 matmuls
        else:
            m = _scaled(self.mamba(n, cache), self.ssm_out_multiplier)
            a = self.self_attn(_scaled(n, self.attention_in_multiplier), mask, cache)
            y = m + _scaled(a, self.attention_out_multiplier)
        h, x = add_and_norm(self.pre_ff_layernorm, h, y)
        return h, self.feed_forward(x)


class FalconH1Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embedding_multiplier = args.embedding_multiplier
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args) for _ in range(args.num_hidden_layers)]
        self.final_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        # A pipeline stage (parallel.pipeline) keeps only its run of layers (the
        # others None, so parameter names keep their numbers) and passes h on.
        self.stage = None

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        h = _scaled(self.embed_tokens(inputs), self.embedding_multiplier)
        layers = [layer for layer in self.layers if layer is not None]
        check_cache_length(cache, len(layers))
        cache = [None] * len(layers) if cache is None else cache
        mask = create_attention_mask(h, cache[0])
        if self.stage is not None:
            h = self.stage.receive(h)
        delta = None  # what the last layer adds to h: the next norm adds it
        for layer, c in zip(layers, cache):
            h, delta = layer.forward(h, delta, mask, c)
        if self.stage is not None:
            h, delta = self.stage.send(h + delta, cache), None
        return add_and_norm(self.final_layernorm, h, delta)[1]


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
        if cache is not None:  # every mixer's state brought up to date first, eagerly
            check_cache_length(cache, len(self.layers))
            for layer, c in zip(self.layers, cache):
                layer.mamba.prepare(c, inputs.shape[1])
        step = decode_step(self, inputs, cache)
        if step is not None:
            return step(self, inputs, cache)  # the same forward, traced once (decode.py)
        return self.forward(inputs, cache)

    def forward(self, inputs: mx.array, cache=None) -> mx.array:
        """The logits over caches that Mixer.prepare has brought up to date."""
        h = self.model(inputs, cache)
        if self.args.tie_word_embeddings:
            logits = self.model.embed_tokens.as_linear(h)
        else:
            logits = linear(self.lm_head, h)
        return _scaled(logits, self.args.lm_head_multiplier)

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map a Hugging Face checkpoint's (or a folder's) tensors onto this model,
        the SSM parameters, conv and norms widened to float32
        (with_float32_parameters). Idempotent."""
        out = {}
        for name, w in weights.items():
            if self.args.tie_word_embeddings and name == "lm_head.weight":
                continue  # some tied checkpoints store the shared matrix twice
            if name.endswith("mamba.conv1d.weight") and w.ndim == 3 and w.shape[-1] != 1:
                w = w.swapaxes(1, 2)  # HF (C, 1, K) -> MLX (C, K, 1)
            out[name] = w
        return with_float32_parameters(out)

    def shard(self, group=None):
        """Tensor parallelism over `group` (mlx-lm's interface); see parallel.py."""
        return parallel.shard(unfuse_projections(self), group)  # it splits the plain layout

    def pipeline(self, group=None, split=None):
        """Keep only this rank's layers of a pipeline over `group`; see parallel.py."""
        return parallel.pipeline(self, group, split)

    # Tokens any cache from make_cache() can be trimmed by (see cache.py).
    rollback_tokens = MAX_ROLLBACK_TOKENS
    # The attention window of caches made without an explicit max_kv_size (the
    # server's --max-kv-size sets it); None: attention sees the whole context.
    max_kv_size: Optional[int] = None

    def make_cache(self, max_kv_size: Optional[int] = None) -> List[FalconH1Cache]:
        """One cache per layer; max_kv_size bounds each layer's attention K/V
        (mlx-lm's --max-kv-size), leaving the conv and SSM state whole."""
        attention_window = self.max_kv_size if max_kv_size is None else max_kv_size
        return [FalconH1Cache(self.rollback_tokens, attention_window) for _ in self.layers]

    @property
    def layers(self):
        """This process's layers: all, or a pipeline stage's (parallel.py)."""
        return [layer for layer in self.model.layers if layer is not None]
