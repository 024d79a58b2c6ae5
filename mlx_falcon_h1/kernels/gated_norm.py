"""The mixer's grouped gated RMSNorm, writing out_proj's input, in one dispatch.

Legend: B batch, d = H*P (d_ssm) channels, G groups of d/G channels, n_p the
prefix's width (the fused [o_proj | out_proj]'s attention part).

Falcon-H1's shapes with `mamba_rms_norm` (1.5B-Deep, 7B, 34B) norm the mixer's
output over each group of d/G channels, with the SiLU gate before the norm or
after it. In a decode step the mixer-step kernel (mixer_step.py) ends where a
group's statistics begin: they span its threadgroups, and a dispatch has no
grid-wide barrier. This kernel finishes it: one threadgroup per (row, group)
sums the group's squares, then writes the normed, weighted (and gated) channels,
scaled, in the output dtype, beside the prefix it copies: the whole input of
out_proj (or of the fused [o_proj | out_proj]). In MLX that is rms_norm, the
weight's multiply, the gate, the scales, casts and a concatenate: six launches.

`gated_norm_reference` is the pure-MLX oracle (the unfused mixer's own ops:
`gated_rms_norm`'s norm and gate, then `with_prefix`, then the cast);
`gated_norm_kernel` is one Metal dispatch; `gated_norm` picks between them.
The three share signature and docstring.

Metal kernel
------------
Grid (threads, G, B), one threadgroup per (row b, group g), threads a multiple
of 32, about d/G / 4 of them, at most 1024 (residual_norm.py's rule). Pass 1:
each thread strides over the group's channels summing x^2 in float32; simd_sum,
one partial per simdgroup in threadgroup memory, one barrier, every thread adds
the partials in the same order; r = precise::rsqrt(sum / (d/G) + eps). Pass 2:
out = O(w x r [* SiLU(gate)] * out_scale), the reference's float32 products in
its order, so the two differ only through r. The prefix is copied by every
threadgroup of the row, thread t of group g its columns g * threads + t, then
every G * threads-th. Memory: a 7B row is 3072 channels (x float32, gate,
weight): ~30 KB, nothing to a launch; one threadgroup per group is enough.
"""

from typing import Optional

import mlx.core as mx

from . import build_metal_kernel, kernels_enabled, with_reference_vjp
from .descriptor import KernelOp, RandomInputs, register
from .elementwise import silu
from .runtime_check import kernel_allowed

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
_READS = 4  # channels per thread before the threadgroup grows (as residual_norm.py)
_MAX_THREADS = 1024  # Metal's threadgroup limit; partial[] below holds 1024 / 32 sums


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


def with_prefix(out: mx.array, prefix: Optional[mx.array], prefix_scale: float,
                out_scale: float) -> mx.array:
    """[prefix * prefix_scale | out * out_scale] (out alone without a prefix), float32."""
    if out_scale != 1.0:  # x * 1.0 is x: the multiply would be a launch for nothing
        out = out * out_scale
    if prefix is None:
        return out
    prefix = prefix.astype(mx.float32)
    if prefix_scale != 1.0:
        prefix = prefix * prefix_scale
    return mx.concatenate([prefix, out], axis=-1)


def check_prefix(prefix: Optional[mx.array], batch: int, op: str) -> None:
    if prefix is not None and (prefix.ndim != 2 or prefix.shape[0] != batch
                               or prefix.shape[1] == 0
                               or not mx.issubdtype(prefix.dtype, mx.floating)):
        raise ValueError(f"{op}: prefix has shape {prefix.shape} and dtype {prefix.dtype}; "
                         f"expected (B, n_p) = ({batch}, n_p > 0) of a float dtype")


def gated_norm_reference(
    x: mx.array,
    gate: Optional[mx.array],
    weight: mx.array,
    groups: int,
    eps: float,
    out_dtype: mx.Dtype,
    *,
    prefix: Optional[mx.array] = None,
    prefix_scale: float = 1.0,
    out_scale: float = 1.0,
) -> mx.array:
    """The grouped RMSNorm of x, gated after it or not, written as out_proj's input.

        m = w * RMS_g(x) * SiLU(gate)           (gate None: no SiLU factor)
        out = m * out_scale                     without a prefix
              [prefix * prefix_scale | m * out_scale]   with one
    in float32, then cast once to out_dtype. A mixer whose gate comes before
    the norm passes x = y * SiLU(z) and no gate; one whose norm comes first, y
    and z (gated_rms_norm's two orders).

    Args:
        x: (B, d) any float dtype (the mixer step's float32 output).
        gate: (B, d) any float dtype, or None.
        weight: (d,) the norm's weight.
        groups: G, a divisor of d: statistics per d/G channels.
        eps: the norm's epsilon.
        out_dtype: the dtype of `out`.
        prefix: (B, n_p), n_p > 0, any float dtype (any strides), or None.
        prefix_scale, out_scale: the multipliers (prefix_scale unused without a prefix).

    Returns:
        out: (B, d), or (B, n_p + d) with a prefix, in out_dtype.
    """
    check_prefix(prefix, x.shape[0], "gated_norm")
    out = group_rms_norm(x.astype(mx.float32), weight, groups, eps)
    if gate is not None:
        out = out * silu(gate.astype(mx.float32))
    return with_prefix(out, prefix, prefix_scale, out_scale).astype(out_dtype)


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_SOURCE = """
    // x: [B, d]; gate: [B, d] (GATE only; otherwise x again, unread); weight: [d];
    // prefix: [B, n_p] (PREFIX only; otherwise x again, unread); all read through
    // their strides. out: [B, n_p + d] in O.
    const int d = x_shape[1];
    const int G = groups;
    const int dg = d / G;
    const int g = threadgroup_position_in_grid.y;
    const int b = threadgroup_position_in_grid.z;
    const int tid = thread_position_in_threadgroup.x;
    const int threads = threads_per_threadgroup.x;
    const int n_prefix = PREFIX ? int(prefix_shape[1]) : 0;
    const int64_t out_row = int64_t(b) * (n_prefix + d);
    threadgroup float partial[32];  // one sum of squares per simdgroup

    float sumsq = 0.0f;
    for (int i = tid; i < dg; i += threads) {
        const float v = static_cast<float>(x[b * x_strides[0] + (g * dg + i) * x_strides[1]]);
        sumsq += v * v;
    }
    sumsq = simd_sum(sumsq);
    if (thread_index_in_simdgroup == 0) {
        partial[simdgroup_index_in_threadgroup] = sumsq;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float total = 0.0f;
    for (int s = 0; s < (threads + 31) / 32; ++s) {
        total += partial[s];
    }
    const float r = metal::precise::rsqrt(total / static_cast<float>(dg) + eps);

    for (int i = tid; i < dg; i += threads) {
        const int ch = g * dg + i;
        const float v = static_cast<float>(x[b * x_strides[0] + ch * x_strides[1]]);
        // The reference's order: the norm (x r), the weight, the gate, the scale.
        float m = static_cast<float>(weight[ch * weight_strides[0]]) * (v * r);
        if (GATE) {
            const float zv = static_cast<float>(gate[b * gate_strides[0] + ch * gate_strides[1]]);
            m = m * (zv * (1.0f / (1.0f + metal::exp(-zv))));
        }
        out[out_row + n_prefix + ch] = static_cast<O>(m * out_scale);
    }
    if (PREFIX) {
        for (int i = g * threads + tid; i < n_prefix; i += G * threads) {
            const float v = static_cast<float>(prefix[b * prefix_strides[0] + i * prefix_strides[1]]);
            out[out_row + i] = static_cast<O>(v * prefix_scale);
        }
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_gated_norm",
    input_names=["x", "gate", "weight", "prefix", "groups", "eps", "prefix_scale", "out_scale"],
    output_names=["out"],
    source=_SOURCE,
    ensure_row_contiguous=False,  # the gate is a view of in_proj's output, the prefix a transpose
)


_KERNEL = build_metal_kernel(KERNEL_SPEC)


def _threads(channels: int) -> int:
    """Threads per group: ~channels / _READS, a whole number of simdgroups, at most _MAX_THREADS."""
    return min(_MAX_THREADS, 32 * -(-channels // (32 * _READS)))


def _fits_kernel(x, gate, weight, groups, out_dtype, prefix) -> bool:
    """Whether gated_norm can take the Metal kernel for this call."""
    return (
        _KERNEL is not None
        and kernels_enabled()
        and x.ndim == 2
        and x.size > 0
        and x.dtype in _FLOATS
        and groups > 0
        and x.shape[1] % groups == 0
        and (gate is None or (gate.shape == x.shape and gate.dtype in _FLOATS))
        and weight.shape == (x.shape[1],)
        and weight.dtype in _FLOATS
        and out_dtype in _FLOATS
        and (prefix is None or (prefix.ndim == 2 and prefix.shape[0] == x.shape[0]
                                and prefix.shape[1] > 0 and prefix.dtype in _FLOATS))
    )


def _launch(kernel, x, gate, weight, prefix, groups, eps, out_dtype, prefix_scale, out_scale):
    batch, d = x.shape
    threads = _threads(d // groups)
    width = d + (0 if prefix is None else prefix.shape[1])
    (out,) = kernel(
        # Placeholders (x) stand in for an absent gate or prefix: never read.
        inputs=[x, x if gate is None else gate, weight, x if prefix is None else prefix,
                int(groups), float(eps), float(prefix_scale), float(out_scale)],
        template=[("O", out_dtype), ("GATE", gate is not None), ("PREFIX", prefix is not None)],
        grid=(threads, groups, batch),
        threadgroup=(threads, 1, 1),
        output_shapes=[(batch, width)],
        output_dtypes=[out_dtype],
    )
    return out


def gated_norm_kernel(
    x: mx.array,
    gate: Optional[mx.array],
    weight: mx.array,
    groups: int,
    eps: float,
    out_dtype: mx.Dtype,
    *,
    prefix: Optional[mx.array] = None,
    prefix_scale: float = 1.0,
    out_scale: float = 1.0,
) -> mx.array:
    # docstring: gated_norm_reference's (assigned below)
    if _KERNEL is None:
        raise RuntimeError("gated_norm_kernel needs Metal; use gated_norm")
    check_prefix(prefix, x.shape[0], "gated_norm")
    optional = {k: a for k, a in (("gate", gate), ("prefix", prefix)) if a is not None}

    def kernel_fn(x, weight, *rest):
        extra = dict(zip(optional, rest))
        return (_launch(_KERNEL, x, extra.get("gate"), weight, extra.get("prefix"), groups, eps,
                        out_dtype, prefix_scale, out_scale),)

    def reference_fn(x, weight, *rest):
        extra = dict(zip(optional, rest))
        return (gated_norm_reference(x, extra.get("gate"), weight, groups, eps, out_dtype,
                                     prefix=extra.get("prefix"), prefix_scale=prefix_scale,
                                     out_scale=out_scale),)

    return with_reference_vjp(kernel_fn, reference_fn)(x, weight, *optional.values())[0]


def gated_norm(
    x: mx.array,
    gate: Optional[mx.array],
    weight: mx.array,
    groups: int,
    eps: float,
    out_dtype: mx.Dtype,
    *,
    prefix: Optional[mx.array] = None,
    prefix_scale: float = 1.0,
    out_scale: float = 1.0,
) -> mx.array:
    # docstring: gated_norm_reference's (assigned below)
    args = (x, gate, weight, groups, eps, out_dtype)
    options = dict(prefix=prefix, prefix_scale=prefix_scale, out_scale=out_scale)
    if _fits_kernel(x, gate, weight, groups, out_dtype, prefix) and kernel_allowed(
            KERNEL_OP, dict(dim=x.shape[1], groups=groups, dtype=x.dtype,
                            gate=None if gate is None else gate.dtype, wdtype=weight.dtype,
                            out_dtype=out_dtype,
                            prefix=0 if prefix is None else prefix.shape[1],
                            prefix_dtype=None if prefix is None else prefix.dtype)):
        return gated_norm_kernel(*args, **options)
    return gated_norm_reference(*args, **options)


gated_norm_kernel.__doc__ = gated_norm.__doc__ = gated_norm_reference.__doc__


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random gated_norm arguments (one token per row); sizes: dim (d), groups, dtype
    (x's), gate (the gate's dtype, default dtype; None: no gate), wdtype (default
    float32, as the models keep norm weights), out_dtype (default dtype), prefix
    (its width n_p, default 0: none), prefix_dtype (default dtype); the scales are
    drawn. The gate is a strided view, as in_proj's z rows are; the prefix a
    transposed one, as attention's output is."""
    draw, dtype, d = RandomInputs(seed), sizes["dtype"], sizes["dim"]
    gate_dtype = sizes.get("gate", dtype)
    n_prefix = sizes.get("prefix", 0)
    scales = draw.rng.uniform(0.25, 4.0, 2)
    return dict(
        x=draw.normal(batch, d, dtype=dtype, scale=3.0),
        gate=None if gate_dtype is None else draw.normal(batch, 2 * d, dtype=gate_dtype, scale=2.0)[:, ::2],
        weight=1.0 + draw.normal(d, dtype=sizes.get("wdtype", mx.float32), scale=0.5),
        groups=sizes["groups"], eps=1e-5, out_dtype=sizes.get("out_dtype", dtype),
        prefix=(draw.normal(n_prefix, batch, dtype=sizes.get("prefix_dtype") or dtype, scale=3.0).T
                if n_prefix else None),
        prefix_scale=float(scales[0]), out_scale=float(scales[1]))


def _rounded_dtype(sizes) -> mx.Dtype:
    """The coarsest dtype the output is rounded to: the output's, or its inputs' (x
    and the prefix in the kernel and the reference alike: no difference there)."""
    return sizes.get("out_dtype", sizes["dtype"])


# Kernel and reference differ only through r = rsqrt(mean(x^2) + eps) (d/G
# float32 squares summed in another order: ~sqrt(d/G) * 2^-24 relative in
# practice, d/G * 2^-24 at worst, halved by the rsqrt) and the SiLU's exp and
# divide (a few ulps; MLX's sigmoid is written otherwise): a few float32 ulps
# of each element, 2e-5 of the largest. Where that carries an element across a
# rounding boundary of O, it differs by one ulp of O: 2^-10 (float16), 2^-7
# (bfloat16) of the element, so of max |out|: 2e-3 and 1e-2.
_TOLERANCE = {mx.float32: 2e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}

KERNEL_OP = register(KernelOp(
    name="gated_norm", spec=KERNEL_SPEC, kernel=gated_norm_kernel, reference=gated_norm_reference,
    make_inputs=_random_inputs, tolerance=_TOLERANCE, tolerance_dtype=_rounded_dtype))
