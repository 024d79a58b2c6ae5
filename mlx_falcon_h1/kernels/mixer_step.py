"""The mixer's whole decode step: ssm_step, then the D skip's output gated and normed.

Legend as in ssm_step.py: B batch, H SSM heads, P head dim, G groups, N state
size, K conv width, C conv channels (H*P + 2*G*N); d = H*P (d_ssm).

`mixer_step_reference` is the pure-MLX oracle (the math of the unfused path:
ssm_step_reference, then the SiLU gate or the grouped gated RMSNorm, as
`gated_rms_norm`); `mixer_step_kernel` runs it as one Metal dispatch plus, for
a mixer with the norm, the norm's statistics; `mixer_step` picks between them.
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
float32 y (norm_before_gate False) or y itself (True), and mx.fast.rms_norm
and the weight (and gate) follow as in the reference.
"""

from typing import Optional, Sequence, Tuple

import mlx.core as mx

from . import build_metal_kernel, with_reference_vjp
from .descriptor import KernelOp, RandomInputs, register
from .elementwise import silu, silu_gate
from .runtime_check import kernel_allowed
from .ssm_step import (_FLOATS, _HEADER, _MAX_N, _ROWS, _STEP_SOURCE, fits_step_source,
                       _param_dtype, _random_inputs as _step_inputs, ssm_step_reference,
                       step_parameters)

NORMS = ("none", "gate_first", "norm_first")  # the op sizes' "norm": no norm, or norm_before_gate


def group_rms_norm(y: mx.array, weight: mx.array, groups: int, eps: float) -> mx.array:
    """weight * RMS over `groups` equal slices of y's last axis, in float32."""
    shape = y.shape
    y = mx.fast.rms_norm(y.reshape(*shape[:-1], groups, -1), None, eps)
    return (weight.astype(mx.float32).reshape(groups, -1) * y).reshape(shape)


def gated_rms_norm(y: mx.array, gate: mx.array, weight: mx.array, groups: int, eps: float,
                   norm_before_gate: bool) -> mx.array:
    """Falcon-H1's grouped gated RMSNorm, in float32: norm_before_gate:
    w * RMS_g(y) * SiLU(gate); otherwise w * RMS_g(y * SiLU(gate))."""
    gate = silu(gate.astype(mx.float32))
    y = y.astype(mx.float32)
    if not norm_before_gate:
        y = y * gate
    y = group_rms_norm(y, weight, groups, eps)
    return y * gate if norm_before_gate else y


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
) -> Tuple[mx.array, mx.array, mx.array]:
    """One token through the Mamba2 mixer between in_proj and out_proj.

        y, conv_state, state <- ssm_step(xBC, dt, conv_state, ..., state)
        out = y * SiLU(z)                              without the norm
              gated_rms_norm(y, z, norm_weight, G)     with it
    in float32, then cast to out_dtype (out_proj's input).

    Args: those of ssm_step (kernels/ssm_step.py), and
        z: (B, d) this token's gate (in_proj's z rows), d = H*P.
        norm_weight: (d,) the gated RMSNorm's weight, or None (no norm).
        eps, norm_before_gate: the norm's (unused without it).
        out_dtype: the dtype of `out`.

    Returns:
        out: (B, d) out_dtype; the new conv_state (B, K-1, C); the new state
        (B, H, P, N) float32.
    """
    y, conv_state, state = ssm_step_reference(xBC, dt, conv_state, conv_weight, conv_bias,
                                              dt_bias, A_log, D, state, time_step_limit, n_groups)
    y = y.reshape(y.shape[0], -1)
    if norm_weight is None:
        out = silu_gate(z.astype(mx.float32), y)
    else:
        out = gated_rms_norm(y, z, norm_weight, n_groups, eps, norm_before_gate)
    return out.astype(out_dtype), conv_state, state


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_SOURCE = _STEP_SOURCE + """\
    // z: [B, H*P] in T, read through its strides; out: [B, H*P] in O.
    if (lane == 0) {
        const float yv = acc + xv * static_cast<float>(D[h * D_strides[0]]);
        const int ch = h * P + p;
        float gated = yv;
        if (GATE) {
            const float zv = static_cast<float>(z[b * z_strides[0] + ch * z_strides[1]]);
            gated = yv * (zv * (1.0f / (1.0f + metal::exp(-zv))));
        }
        out[int64_t(b) * H * P + ch] = static_cast<O>(gated);
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_mixer_step",
    input_names=[
        "xBC", "dt", "z", "conv_state", "conv_weight", "conv_bias", "dt_bias", "A_log", "D",
        "state", "dt_min", "dt_max", "n_groups",
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
                 out_dtype) -> bool:
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
    )


def _launch(kernel, xBC, dt, z, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state,
            time_step_limit, n_groups, gate, out_dtype):
    batch, heads, head_dim, _ = state.shape
    return tuple(
        kernel(
            inputs=[xBC, dt, z, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state,
                    float(time_step_limit[0]), float(time_step_limit[1]), int(n_groups)],
            template=[("T", xBC.dtype), ("W", conv_weight.dtype), ("O", out_dtype),
                      ("K", conv_weight.shape[1]), ("MAX_N", _MAX_N), ("GATE", bool(gate))],
            grid=(32, head_dim, batch * heads),
            threadgroup=(32, _ROWS, 1),
            output_shapes=[(batch, heads * head_dim), conv_state.shape, state.shape],
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
) -> Tuple[mx.array, mx.array, mx.array]:
    # docstring: mixer_step_reference's (assigned below)
    if _KERNEL is None:
        raise RuntimeError("mixer_step_kernel needs Metal; use mixer_step")
    params = step_parameters(conv_weight, conv_bias, dt_bias, A_log, D)
    limit = tuple(time_step_limit)
    normed = norm_weight is not None
    gate = not (normed and norm_before_gate)  # norm first: the gate follows the norm, below
    kernel_dtype = mx.float32 if normed else out_dtype

    def kernel_fn(xBC, dt, z, *rest):
        *arrays, weight = rest if normed else (*rest, None)
        out, conv, ssm = _launch(_KERNEL, xBC, dt, z, *arrays, limit, n_groups, gate, kernel_dtype)
        if normed:  # the statistics span threadgroups (module docstring)
            out = group_rms_norm(out, weight, n_groups, eps)
            if norm_before_gate:
                out = out * silu(z.astype(mx.float32))
            out = out.astype(out_dtype)
        return out, conv, ssm

    def reference_fn(xBC, dt, z, *rest):
        *arrays, weight = rest if normed else (*rest, None)
        return mixer_step_reference(xBC, dt, z, *arrays, weight, limit, n_groups, eps,
                                    norm_before_gate, out_dtype)

    fn = with_reference_vjp(kernel_fn, reference_fn)
    return fn(xBC, dt, z, conv_state, *params, state, *([norm_weight] if normed else []))


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
) -> Tuple[mx.array, mx.array, mx.array]:
    # docstring: mixer_step_reference's (assigned below)
    args = (xBC, dt, z, conv_state, conv_weight, conv_bias, dt_bias, A_log, D, state, norm_weight,
            time_step_limit, n_groups, eps, norm_before_gate, out_dtype)
    if _fits_kernel(xBC, dt, z, conv_state, conv_weight, conv_bias, state, norm_weight, n_groups,
                    out_dtype) and kernel_allowed(
            KERNEL_OP, dict(heads=state.shape[1], head_dim=state.shape[2], groups=n_groups,
                            n=state.shape[3], width=conv_weight.shape[1], dtype=xBC.dtype,
                            wdtype=_param_dtype(conv_weight, conv_bias, dt_bias, A_log, D),
                            norm=_norm_mode(norm_weight, norm_before_gate), out_dtype=out_dtype)):
        return mixer_step_kernel(*args)
    return mixer_step_reference(*args)


mixer_step_kernel.__doc__ = mixer_step.__doc__ = mixer_step_reference.__doc__


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random mixer_step arguments (one token); sizes: those of ssm_step's inputs,
    and norm (one of NORMS, default "none") and out_dtype (default dtype)."""
    inputs = _step_inputs(sizes, batch=batch, seed=seed)
    h, p, dtype = sizes["heads"], sizes["head_dim"], sizes["dtype"]
    norm = sizes.get("norm", "none")
    if norm not in NORMS:
        raise ValueError(f"mixer_step sizes: norm {norm!r}; valid: {', '.join(NORMS)}")
    draw = RandomInputs(seed + 1)  # not ssm_step's draws again
    return dict(
        inputs, z=draw.normal(batch, h * p, dtype=dtype, scale=2.0),
        norm_weight=None if norm == "none" else 1.0 + draw.normal(h * p, scale=0.5),
        eps=1e-5, norm_before_gate=norm == "norm_first", out_dtype=sizes.get("out_dtype", dtype))


KERNEL_OP = register(KernelOp(
    name="mixer_step", spec=KERNEL_SPEC, kernel=mixer_step_kernel, reference=mixer_step_reference,
    make_inputs=_random_inputs,
    # ssm_step's: the output is the state's y through elementwise float32 ops and a norm.
    tolerance={mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}))
