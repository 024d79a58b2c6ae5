"""The mixer's whole decode step: ssm_step, then the D skip's output gated and normed.

Legend as in ssm_step.py: B batch, H SSM heads, P head dim, G groups, N state
size, K conv width, C conv channels (H*P + 2*G*N); d = H*P (d_ssm).

`mixer_step_reference` is the pure-MLX oracle (the math of the unfused path:
ssm_step_reference, then the SiLU gate or the grouped gated RMSNorm, as
`gated_rms_norm`); `mixer_step_kernel` runs it as one Metal dispatch, two for
a mixer with the norm (this kernel, then gated_norm.py's); `mixer_step` picks
between them.
The three share signature and docstring.

Metal kernel
------------
ssm_step's kernel (threads, phases and memory traffic: see ssm_step.py), whose
rows end with the gate instead of writing y: lane 0 of row (b, h, p) reads
z[b, h*P + p] and writes y * SiLU(z), in the output dtype. Without the norm
that is the mixer's whole output, and the gate's elementwise launch and the
cast before out_proj are gone. With the norm, its statistics are over a
group's d/G channels, spread over many threadgroups: a dispatch has no grid-wide
barrier, and one threadgroup per group would stream a whole group's state
(3 MB per layer at 7B) through one GPU core. So the kernel writes the gated
float32 y (norm_before_gate False) or y itself (True), and gated_norm.py's
kernel, one threadgroup per group over those d/G floats, finishes the norm, the
weight, the gate (norm first), the scales and the prefix: two launches in all.

The prefix: out_proj's fused input
----------------------------------
With fused projections a layer computes [o_proj | out_proj] @ [a * s_a ; m * s_m]
(a the attention's output, m the mixer's, s_a and s_m the muP multipliers). Given
`prefix` (a), the kernel writes that whole input: row b of `out` is
[prefix[b] * prefix_scale | m[b] * out_scale], so no concatenate follows. Lane 0 of
row (b, h, p) writes m's channel h*P + p at column n_p + h*P + p; the other 31
lanes of the batch row's H*P rows (31*H*P threads: 0.5B has 47616, its prefix 512)
copy the prefix, lane l of row (h, p) its columns (h*P + p)*31 + l - 1, then
every 31*H*P-th one after, read through its strides (attention's output is a
transposed view). Both scales are kernel inputs (one compiled kernel for every
multiplier). With the norm the prefix and the scales are gated_norm's to write.
"""

from typing import Optional, Sequence, Tuple

import mlx.core as mx

from . import build_metal_kernel, with_reference_vjp
from .descriptor import KernelOp, RandomInputs, register
from .elementwise import silu_gate
from .gated_norm import check_prefix, gated_norm, gated_rms_norm, with_prefix
from .runtime_check import kernel_allowed
from .ssm_step import (_FLOATS, _HEADER, _MAX_N, _ROWS, _STEP_SOURCE, fits_step_source,
                       _param_dtype, _random_inputs as _step_inputs, ssm_step_reference,
                       step_parameters)

NORMS = ("none", "gate_first", "norm_first")  # the op sizes' "norm": no norm, or norm_before_gate


def mixer_step_reference(
    xBC: mx.array,
    dt: mx.array,
    z: mx.array,
    conv_state: mx.array,
    conv_weight: mx.array,
    conv_bias: Optional[mx.array],
    dt_bias: mx.array,
    A_log: mx.array,
    D: mx.array,
    state: mx.array,
    norm_weight: Optional[mx.array],
    time_step_limit: Sequence[float],
    n_groups: int,
    eps: float,
    norm_before_gate: bool,
    out_dtype: mx.Dtype,
    *,
    prefix: Optional[mx.array] = None,
    prefix_scale: float = 1.0,
    out_scale: float = 1.0,
) -> Tuple[mx.array, mx.array, mx.array]:
    """One token through the Mamba2 mixer between in_proj and out_proj.

        y, conv_state, state <- ssm_step(xBC, dt, conv_state, ..., state)
        m = y * SiLU(z)                              without the norm
            gated_rms_norm(y, z, norm_weight, G)     with it
        out = m * out_scale                          without a prefix
              [prefix * prefix_scale | m * out_scale]   with one (out_proj's fused input)
    in float32, then cast once to out_dtype (out_proj's input).

    Args: those of ssm_step (kernels/ssm_step.py), and
        z: (B, d) this token's gate (in_proj's z rows), d = H*P.
        norm_weight: (d,) the gated RMSNorm's weight, or None (no norm).
        eps, norm_before_gate: the norm's (unused without it).
        out_dtype: the dtype of `out`.
        prefix: (B, n_p), n_p > 0, any float dtype (any strides), or None.
        prefix_scale: the prefix's multiplier (unused without a prefix).
        out_scale: the mixer output's multiplier.

    Returns:
        out: (B, d), or (B, n_p + d) with a prefix, in out_dtype; the new
        conv_state (B, K-1, C); the new state (B, H, P, N) float32.
    """
    check_prefix(prefix, xBC.shape[0], "mixer_step")
    y, conv_state, state = ssm_step_reference(xBC, dt, conv_state, conv_weight, conv_bias,
                                              dt_bias, A_log, D, state, time_step_limit, n_groups)
    y = y.reshape(y.shape[0], -1)
    if norm_weight is None:
        out = silu_gate(z.astype(mx.float32), y)
    else:
        out = gated_rms_norm(y, z, norm_weight, n_groups, eps, norm_before_gate)
    return with_prefix(out, prefix, prefix_scale, out_scale).astype(out_dtype), conv_state, state


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_SOURCE = _STEP_SOURCE + """\
    // z: [B, H*P] in T; prefix: [B, n_p] (PREFIX only; otherwise a placeholder never
    // read), any float type; both read through their strides.
    // out: [B, n_p + H*P] in O: [prefix * prefix_scale | gated * out_scale].
    const int n_prefix = PREFIX ? int(prefix_shape[1]) : 0;
    const int64_t out_row = int64_t(b) * (n_prefix + H * P);
    if (lane == 0) {
        const float yv = acc + xv * static_cast<float>(D[h * D_strides[0]]);
        const int ch = h * P + p;
        float gated = yv;
        if (GATE) {
            const float zv = static_cast<float>(z[b * z_strides[0] + ch * z_strides[1]]);
            gated = yv * (zv * (1.0f / (1.0f + metal::exp(-zv))));
        }
        out[out_row + n_prefix + ch] = static_cast<O>(gated * out_scale);
    } else if (PREFIX) {
        // Batch row b's prefix, over the 31 other lanes of each of its H*P rows.
        const int copiers = 31 * H * P;
        for (int i = (h * P + p) * 31 + lane - 1; i < n_prefix; i += copiers) {
            const float v = static_cast<float>(prefix[b * prefix_strides[0] + i * prefix_strides[1]]);
            out[out_row + i] = static_cast<O>(v * prefix_scale);
        }
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_mixer_step",
    input_names=[
        "xBC", "dt", "z", "conv_state", "conv_weight", "conv_bias", "dt_bias", "A_log", "D",
        "state", "prefix", "dt_min", "dt_max", "n_groups", "prefix_scale", "out_scale",
    ],
    output_names=["out", "conv_state_out", "state_out"],
    source=_SOURCE,
    header=_HEADER,
    ensure_row_contiguous=False,
)


_KERNEL = build_metal_kernel(KERNEL_SPEC)


def _norm_mode(norm_weight, norm_before_gate) -> str:
    return "none" if norm_weight is None else ("norm_first" if norm_before_gate else "gate_first")


def _fits_kernel(xBC, dt, z, conv_state, conv_weight, conv_bias, state, norm_weight, n_groups,
                 out_dtype, prefix) -> bool:
    """Whether mixer_step can take the Metal kernel for this call."""
    batch, heads, head_dim, _ = state.shape
    d = heads * head_dim
    return (
        _KERNEL is not None
        and fits_step_source(xBC, dt, conv_state, conv_weight, conv_bias, state, n_groups)
        and z.dtype == xBC.dtype
        and z.shape == (batch, d)
        and out_dtype in _FLOATS
        and (norm_weight is None or (norm_weight.shape == (d,) and d % n_groups == 0))
        and (prefix is None or (prefix.ndim == 2 and prefix.shape[0] == batch
                                and prefix.shape[1] > 0 and prefix.dtype in _FLOATS))
    )


def _launch(kernel, xBC, dt, z, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state,
            prefix, time_step_limit, n_groups, gate, out_dtype, prefix_scale, out_scale):
    batch, heads, head_dim, _ = state.shape
    width = heads * head_dim + (0 if prefix is None else prefix.shape[1])
    return tuple(
        kernel(
            # Without a prefix, z stands in for it (PREFIX false: never read).
            inputs=[xBC, dt, z, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state,
                    z if prefix is None else prefix, float(time_step_limit[0]),
                    float(time_step_limit[1]), int(n_groups), float(prefix_scale),
                    float(out_scale)],
            template=[("T", xBC.dtype), ("W", conv_weight.dtype), ("O", out_dtype),
                      ("K", conv_weight.shape[1]), ("MAX_N", _MAX_N), ("GATE", bool(gate)),
                      ("PREFIX", prefix is not None)],
            grid=(32, head_dim, batch * heads),
            threadgroup=(32, _ROWS, 1),
            output_shapes=[(batch, width), conv_state.shape, state.shape],
            output_dtypes=[out_dtype, xBC.dtype, mx.float32],
        )
    )


def mixer_step_kernel(
    xBC: mx.array,
    dt: mx.array,
    z: mx.array,
    conv_state: mx.array,
    conv_weight: mx.array,
    conv_bias: Optional[mx.array],
    dt_bias: mx.array,
    A_log: mx.array,
    D: mx.array,
    state: mx.array,
    norm_weight: Optional[mx.array],
    time_step_limit: Sequence[float],
    n_groups: int,
    eps: float,
    norm_before_gate: bool,
    out_dtype: mx.Dtype,
    *,
    prefix: Optional[mx.array] = None,
    prefix_scale: float = 1.0,
    out_scale: float = 1.0,
) -> Tuple[mx.array, mx.array, mx.array]:
    # docstring: mixer_step_reference's (assigned below)
    if _KERNEL is None:
        raise RuntimeError("mixer_step_kernel needs Metal; use mixer_step")
    check_prefix(prefix, xBC.shape[0], "mixer_step")
    params = step_parameters(conv_weight, conv_bias, dt_bias, A_log, D)
    limit = tuple(time_step_limit)
    normed = norm_weight is not None
    gate = not (normed and norm_before_gate)  # norm first: the gate follows the norm, below
    # The differentiable arrays: the step's, then the norm weight and the prefix if given.
    optional = {k: a for k, a in (("norm_weight", norm_weight), ("prefix", prefix)) if a is not None}

    def kernel_fn(xBC, dt, z, conv_state, *rest):
        arrays, extra = rest[:6], dict(zip(optional, rest[6:]))
        if not normed:  # one dispatch writes the whole output
            return _launch(_KERNEL, xBC, dt, z, conv_state, *arrays, extra.get("prefix"), limit,
                           n_groups, gate, out_dtype, prefix_scale, out_scale)
        # The norm's statistics span threadgroups (module docstring): gated_norm's
        # kernel finishes it from the gated float32 y (or y and z, norm first).
        y, conv, ssm = _launch(_KERNEL, xBC, dt, z, conv_state, *arrays, None, limit, n_groups,
                               gate, mx.float32, 1.0, 1.0)
        out = gated_norm(y, z if norm_before_gate else None, extra["norm_weight"], n_groups, eps,
                         out_dtype, prefix=extra.get("prefix"), prefix_scale=prefix_scale,
                         out_scale=out_scale)
        return out, conv, ssm

    def reference_fn(xBC, dt, z, conv_state, *rest):
        arrays, extra = rest[:6], dict(zip(optional, rest[6:]))
        return mixer_step_reference(xBC, dt, z, conv_state, *arrays, extra.get("norm_weight"),
                                    limit, n_groups, eps,
                                    norm_before_gate, out_dtype, prefix=extra.get("prefix"),
                                    prefix_scale=prefix_scale, out_scale=out_scale)

    fn = with_reference_vjp(kernel_fn, reference_fn)
    return fn(xBC, dt, z, conv_state, *params, state, *optional.values())


def mixer_step(
    xBC: mx.array,
    dt: mx.array,
    z: mx.array,
    conv_state: mx.array,
    conv_weight: mx.array,
    conv_bias: Optional[mx.array],
    dt_bias: mx.array,
    A_log: mx.array,
    D: mx.array,
    state: mx.array,
    norm_weight: Optional[mx.array],
    time_step_limit: Sequence[float],
    n_groups: int,
    eps: float,
    norm_before_gate: bool,
    out_dtype: mx.Dtype,
    *,
    prefix: Optional[mx.array] = None,
    prefix_scale: float = 1.0,
    out_scale: float = 1.0,
) -> Tuple[mx.array, mx.array, mx.array]:
    # docstring: mixer_step_reference's (assigned below)
    args = (xBC, dt, z, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state, norm_weight,
            time_step_limit, n_groups, eps, norm_before_gate, out_dtype)
    options = dict(prefix=prefix, prefix_scale=prefix_scale, out_scale=out_scale)
    if _fits_kernel(xBC, dt, z, conv_state, conv_weight, conv_bias, state, norm_weight, n_groups,
                    out_dtype, prefix) and kernel_allowed(
            KERNEL_OP, dict(heads=state.shape[1], head_dim=state.shape[2], groups=n_groups,
                            n=state.shape[3], width=conv_weight.shape[1], dtype=xBC.dtype,
                            wdtype=_param_dtype(conv_weight, conv_bias, dt_bias, A_log, D),
                            norm=_norm_mode(norm_weight, norm_before_gate), out_dtype=out_dtype,
                            # the prefix's width and dtype: another instantiation and output
                            prefix=0 if prefix is None else prefix.shape[1],
                            prefix_dtype=None if prefix is None else prefix.dtype)):
        return mixer_step_kernel(*args, **options)
    return mixer_step_reference(*args, **options)


mixer_step_kernel.__doc__ = mixer_step.__doc__ = mixer_step_reference.__doc__


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random mixer_step arguments (one token); sizes: those of ssm_step's inputs,
    and norm (one of NORMS, default "none"), out_dtype (default dtype), prefix
    (its width n_p, default 0: none), prefix_dtype (default dtype), prefix_scale and
    out_scale (default 1.0 without a prefix, drawn with one). The prefix is a
    transposed view, as attention's output is."""
    inputs = _step_inputs(sizes, batch=batch, seed=seed)
    h, p, dtype = sizes["heads"], sizes["head_dim"], sizes["dtype"]
    norm = sizes.get("norm", "none")
    if norm not in NORMS:
        raise ValueError(f"mixer_step sizes: norm {norm!r}; valid: {', '.join(NORMS)}")
    draw = RandomInputs(seed + 1)  # not ssm_step's draws again
    inputs = dict(
        inputs, z=draw.normal(batch, h * p, dtype=dtype, scale=2.0),
        norm_weight=None if norm == "none" else 1.0 + draw.normal(h * p, scale=0.5),
        eps=1e-5, norm_before_gate=norm == "norm_first", out_dtype=sizes.get("out_dtype", dtype))
    n_prefix = sizes.get("prefix", 0)
    draw = RandomInputs(seed + 2)  # the inputs above as without a prefix
    prefix_dtype = sizes.get("prefix_dtype") or dtype
    scales = draw.rng.uniform(0.25, 4.0, 2) if n_prefix else (1.0, 1.0)
    return dict(
        inputs,
        prefix=draw.normal(n_prefix, batch, dtype=prefix_dtype, scale=3.0).T if n_prefix else None,
        prefix_scale=float(sizes.get("prefix_scale", scales[0])),
        out_scale=float(sizes.get("out_scale", scales[1])))


KERNEL_OP = register(KernelOp(
    name="mixer_step", spec=KERNEL_SPEC, kernel=mixer_step_kernel, reference=mixer_step_reference,
    make_inputs=_random_inputs,
    # ssm_step's: the output is the state's y through elementwise float32 ops and a norm.
    tolerance={mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}))
