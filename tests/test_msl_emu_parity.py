"""The emulator's Metal source generation equals the installed MLX's, byte for byte.

MLX prints the source it generates for a metal_kernel call (verbose=True) even
without Metal, while mx.export_function traces the call. If a new MLX changes
its code generation (names, buffer order, attributes), these tests fail before
the emulator drifts from what the GPU compiles.
"""

import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1.kernels import conv1d, gated_norm, quantized_attention, ssd_scan, ssm_step  # noqa: E402
from mlx_falcon_h1.msl_emu import metal_kernel  # noqa: E402
from mlx_falcon_h1.msl_emu.mlx_oracle import mlx_generated_source  # noqa: E402


def assert_same_source(spec, inputs, output_shapes, output_dtypes, grid, threadgroup, template):
    ours = metal_kernel(**spec).metal_source(inputs, output_dtypes, template)
    theirs = mlx_generated_source(**spec, inputs=inputs, output_shapes=output_shapes,
                                  output_dtypes=output_dtypes, grid=grid,
                                  threadgroup=threadgroup, template=template)
    assert ours.rstrip("\n") == theirs.rstrip("\n")


GENERIC = {
    # template dtype + int + bool, shape/strides/ndim, a small (constant) input,
    # a scalar input, two outputs, a header
    "everything": dict(
        spec=dict(name="args", input_names=["a", "b", "c", "d"], output_names=["o1", "o2"],
                  header="// hdr\n",
                  source="uint e = thread_position_in_grid.x; T t = a[0]; if (flag) o1[e] = a[e] + "
                         "b[0] + c[1] + d + K;\n  o2[e] = a_shape[0] + a_strides[0] + a_ndim + "
                         "simd_sum(1.0f) + threads_per_threadgroup.x;"),
        inputs=[mx.zeros((3, 6)), mx.array([3, 4, 5]), mx.zeros((2, 2), mx.bfloat16), 7.3],
        output_shapes=[(3, 2), (3, 2)], output_dtypes=[mx.float32, mx.int32],
        template=[("flag", True), ("K", 3), ("T", mx.float16)]),
    "atomic_outputs_no_template": dict(
        spec=dict(name="atom", input_names=["x"], output_names=["acc"], atomic_outputs=True,
                  source="atomic_fetch_add_explicit(&acc[0], x[thread_position_in_grid.x], "
                         "memory_order_relaxed);"),
        inputs=[mx.zeros(64)], output_shapes=[(1,)], output_dtypes=[mx.float32], template=None),
    "no_attributes": dict(
        spec=dict(name="noattr", input_names=["x"], output_names=["y", "z"],
                  source="y[0] = x_shape[0]; z[0] = 1;"),
        inputs=[mx.zeros(16)], output_shapes=[(1,), (1,)], output_dtypes=[mx.float32] * 2,
        template=None),
}


@pytest.mark.parametrize("case", list(GENERIC))
def test_generic_source_generation(case):
    c = GENERIC[case]
    assert_same_source(c["spec"], c["inputs"], c["output_shapes"], c["output_dtypes"], (32, 1, 1),
                       (32, 1, 1), c["template"])


class Recorder:
    """Stands in for a kernel object and records the call a module's _launch makes."""

    def __call__(self, **call):
        self.call = call
        return [mx.zeros(s, d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]


def launches():
    z = mx.zeros
    for dt in (mx.float32, mx.float16, mx.bfloat16):
        yield "conv1d", conv1d, (z((2, 5, 24), dt), z((24, 4)), z((24,)), z((2, 3, 24), dt))
        channels = 4 * 8 + 2 * 2 * 16
        yield "ssm_step", ssm_step, (
            z((2, channels), dt), z((2, 4), dt), z((2, 3, channels), dt), z((channels, 4), dt),
            z((channels,), dt), z((4,), dt), z((4,), dt), z((4,), dt), z((2, 4, 8, 16)),
            (0.0, math.inf), 2)
        yield "ssd_scan", ssd_scan, (
            z((2, 5, 4, 8), dt), z((2, 5, 4)), z((4,)), z((2, 5, 2, 16), dt), z((2, 5, 2, 16), dt),
            z((4,)), z((2, 4, 8, 16)))
        # x, gate (a strided view, as in_proj's z), weight, prefix (a transpose), groups, eps,
        # out dtype, scales
        yield "gated_norm", gated_norm, (
            z((2, 64)), z((2, 128), dt)[:, ::2], z((64,)), z((16, 2), dt).T, 2, 1e-5, dt, 0.5, 2.0)


@pytest.mark.parametrize("name,module,args", list(launches()),
                         ids=[f"{n}-{a[0].dtype}".replace("mlx.core.", "") for n, _, a in launches()])
def test_kernel_source_generation(name, module, args):
    rec = Recorder()
    module._launch(rec, *args)
    c = rec.call
    assert_same_source(module.KERNEL_SPEC, c["inputs"], c["output_shapes"], c["output_dtypes"],
                       c["grid"], c["threadgroup"], c["template"])


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_two_pass_kernel_source_generation(dtype):
    """quantized_decode_attention's two launches: each pass's spec and call (its
    lengths are 0-d arrays, which MLX passes as constant scalars)."""
    z = mx.zeros
    b, hq, hkv, d, cb, ct = 1, 6, 2, 64, 10, 4
    bulk = (z((b, hkv, cb, d // 8), mx.uint32), z((b, hkv, cb, 2), dtype), z((b, hkv, cb, 2), dtype))
    first, combine = Recorder(), Recorder()
    quantized_attention._launch(first, combine, z((b, hq, 1, d), dtype), bulk, bulk,
                                mx.array(3, mx.int32), z((b, hkv, ct, d), dtype),
                                z((b, hkv, ct, d), dtype), mx.array(2, mx.int32), 0.125, 32, 4)
    for rec, spec in ((first, quantized_attention.KERNEL_SPEC),
                      (combine, quantized_attention.KERNEL_SPEC_COMBINE)):
        c = rec.call
        assert_same_source(spec, c["inputs"], c["output_shapes"], c["output_dtypes"], c["grid"],
                           c["threadgroup"], c["template"])


def test_numpy_and_mlx_inputs_generate_the_same_source():
    k = metal_kernel(**conv1d.KERNEL_SPEC)
    as_mx = [mx.zeros((2, 5, 24)), mx.zeros((24, 4)), mx.zeros((24,)), mx.zeros((2, 3, 24))]
    as_np = [np.zeros(a.shape, np.float32) for a in as_mx]
    tmpl = [("T", mx.float32), ("W", mx.float32), ("K", 4), ("TOKENS", 16)]
    assert k.metal_source(as_mx, [mx.float32] * 2, tmpl) == k.metal_source(as_np, [np.float32] * 2, tmpl)
