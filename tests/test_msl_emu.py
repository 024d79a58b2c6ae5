"""The Metal emulator itself: semantics, and the bugs it must catch.

Sample kernels here are small Mamba-shaped bodies written for these tests
(the package's real kernels are tested in test_kernels_*.py). Each bug test
mutates a correct kernel and asserts the emulator reports it.
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.msl_emu import MSLEmuError, metal_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")


def mutate(src, old, new):
    assert src.count(old) == 1, old
    return src.replace(old, new)


def as_np(a):
    return np.array(a.astype(mx.float32)) if isinstance(a, mx.array) else a


# ------------------------------------------------------------------ SSM update
# state[b,h,p,n] <- state * exp(dt*A[h]) + dt * B[b,g,n] * x[b,h,p];  y = state . C + D x
# One simdgroup per (b, h, p) row, lane-strided over n. grid (32, P, B*H), tg (32, 8, 1).
SSM_SRC = """
    const uint lane = thread_index_in_simdgroup;
    const uint p = thread_position_in_grid.y;
    const uint bh = thread_position_in_grid.z;
    const uint b = bh / H;
    const uint h = bh % H;
    const uint g = h / (H / G);
    constexpr int NPL = N / 32;

    float dtv = static_cast<float>(dt[bh]) + static_cast<float>(dt_bias[h]);
    dtv = dtv > 20.0f ? dtv : metal::log(1.0f + metal::exp(dtv));
    const float dA = metal::exp(dtv * static_cast<float>(A[h]));
    const float xv = static_cast<float>(x[bh * P + p]);
    const size_t srow = (size_t(bh) * P + p) * N;
    const size_t bc = (size_t(b) * G + g) * N;
    float acc = 0.0f;
    for (int i = 0; i < NPL; ++i) {
        const uint n = i * 32 + lane;
        float s = static_cast<float>(state_in[srow + n]) * dA
                + dtv * static_cast<float>(Bm[bc + n]) * xv;
        state_out[srow + n] = static_cast<S>(s);
        acc += s * static_cast<float>(Cm[bc + n]);
    }
    acc = simd_sum(acc);
    if (lane == 0) {
        y[bh * P + p] = static_cast<T>(acc + static_cast<float>(D[h]) * xv);
    }
"""
# Variant: one thread per state element, per-simdgroup partial sums through
# threadgroup memory. grid (N, P, B*H), tg (N, 1, 1).
SSM_TG_SRC = """
    const uint n = thread_position_in_threadgroup.x;
    const uint sg = simdgroup_index_in_threadgroup;
    const uint p = thread_position_in_grid.y;
    const uint bh = thread_position_in_grid.z;
    const uint b = bh / H;
    const uint h = bh % H;
    const uint g = h / (H / G);
    threadgroup float partial[N / 32];

    float dtv = static_cast<float>(dt[bh]) + static_cast<float>(dt_bias[h]);
    dtv = dtv > 20.0f ? dtv : metal::log(1.0f + metal::exp(dtv));
    const float dA = metal::exp(dtv * static_cast<float>(A[h]));
    const float xv = static_cast<float>(x[bh * P + p]);
    const size_t srow = (size_t(bh) * P + p) * N;
    const size_t bc = (size_t(b) * G + g) * N;
    float s = static_cast<float>(state_in[srow + n]) * dA
            + dtv * static_cast<float>(Bm[bc + n]) * xv;
    state_out[srow + n] = static_cast<S>(s);
    float part = simd_sum(s * static_cast<float>(Cm[bc + n]));
    if (thread_index_in_simdgroup == 0) {
        partial[sg] = part;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (n == 0) {
        float acc = 0.0f;
        for (int i = 0; i < N / 32; ++i) {
            acc += partial[i];
        }
        y[bh * P + p] = static_cast<T>(acc + static_cast<float>(D[h]) * xv);
    }
"""
SSM_INPUTS = ["x", "dt", "dt_bias", "A", "Bm", "Cm", "D", "state_in"]


def ssm_ref(x, dt, dt_bias, A, Bm, Cm, D, state):
    x, dt, dt_bias, A, Bm, Cm, D, state = (np.asarray(as_np(a), np.float64) for a in
                                           (x, dt, dt_bias, A, Bm, Cm, D, state))
    H = x.shape[1]
    dtv = dt + dt_bias[None]
    dtv = np.where(dtv > 20, dtv, np.log1p(np.exp(dtv)))
    dA = np.exp(dtv * A[None])
    gidx = np.arange(H) // (H // Bm.shape[1])
    new = state * dA[..., None, None] + dtv[..., None, None] * Bm[:, gidx, None, :] * x[..., None]
    return (new * Cm[:, gidx, None, :]).sum(-1) + D[None, :, None] * x, new


def ssm_inputs(seed, Bsz=2, H=8, G=2, P=16, N=64, T=mx.float32, S=mx.float32):
    rng = np.random.default_rng(seed)
    f = lambda shape, scale=1.0, dt=T: mx.array(rng.standard_normal(shape) * scale).astype(dt)
    return dict(x=f((Bsz, H, P)), dt=f((Bsz, H), 0.5), dt_bias=f(H, 0.1, mx.float32),
                A=-mx.exp(f(H, 0.5, mx.float32)), Bm=f((Bsz, G, N)), Cm=f((Bsz, G, N)),
                D=f(H, 1.0, mx.float32), state_in=f((Bsz, H, P, N), 1.0, S))


def run_ssm(src, inp, Bsz, H, G, P, N, T=mx.float32, S=mx.float32, tg=(32, 8, 1), grid=None, **kw):
    k = metal_kernel(name="ssm_update", input_names=SSM_INPUTS, output_names=["y", "state_out"],
                     source=src)
    return k(inputs=[inp[n] for n in SSM_INPUTS], output_shapes=[(Bsz, H, P), (Bsz, H, P, N)],
             output_dtypes=[T, S], grid=grid or (32, P, Bsz * H), threadgroup=tg,
             template=[("T", T), ("S", S), ("H", H), ("G", G), ("N", N), ("P", P)], **kw)


@pytest.mark.parametrize("T,S,tol", [(mx.float32, mx.float32, 1e-5), (mx.float16, mx.float32, 2e-2),
                                     (mx.bfloat16, mx.bfloat16, 2e-1)])
def test_ssm_update(T, S, tol):
    dims = dict(Bsz=2, H=8, G=2, P=16, N=64)
    inp = ssm_inputs(0, **dims, T=T, S=S)
    y, st = run_ssm(SSM_SRC, inp, **dims, T=T, S=S)
    yr, sr = ssm_ref(*[inp[n] for n in SSM_INPUTS])
    assert y.dtype == T and st.dtype == S
    np.testing.assert_allclose(as_np(y), yr, rtol=tol, atol=tol)
    np.testing.assert_allclose(as_np(st), sr, rtol=tol, atol=tol)


def test_partial_threadgroups():
    # P = 12 with 8 rows per threadgroup: the second threadgroup along y is partial
    dims = dict(Bsz=1, H=4, G=1, P=12, N=32)
    inp = ssm_inputs(1, **dims)
    y, _ = run_ssm(SSM_SRC, inp, **dims)
    np.testing.assert_allclose(as_np(y), ssm_ref(*[inp[n] for n in SSM_INPUTS])[0], rtol=1e-5,
                               atol=1e-5)


def test_threadgroup_memory_variant():
    dims = dict(Bsz=2, H=4, G=2, P=8, N=128)
    inp = ssm_inputs(2, **dims)
    y, st = run_ssm(SSM_TG_SRC, inp, **dims, grid=(128, 8, 8), tg=(128, 1, 1))
    yr, sr = ssm_ref(*[inp[n] for n in SSM_INPUTS])
    np.testing.assert_allclose(as_np(y), yr, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_np(st), sr, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------- conv1d update
CONV_SRC = """
    const uint c = thread_position_in_grid.x;
    const uint b = thread_position_in_grid.y;
    float acc = static_cast<float>(bias[c]);
    for (int k = 0; k < K - 1; ++k) {
        const T v = conv_state[(b * (K - 1) + k) * C + c];
        acc += static_cast<float>(v) * static_cast<float>(w[c * K + k]);
        if (k > 0) {
            new_state[(b * (K - 1) + k - 1) * C + c] = v;
        }
    }
    const T xv = x[b * C + c];
    acc += static_cast<float>(xv) * static_cast<float>(w[c * K + K - 1]);
    new_state[(b * (K - 1) + K - 2) * C + c] = xv;
    y[b * C + c] = static_cast<T>(SILU ? acc / (1.0f + metal::exp(-acc)) : acc);
"""


def conv_inputs(seed, Bsz=3, C=96, K=4):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((Bsz, C)).astype(np.float32),
            rng.standard_normal((Bsz, K - 1, C)).astype(np.float32),
            (rng.standard_normal((C, K)) * 0.5).astype(np.float32),
            rng.standard_normal(C).astype(np.float32))


def conv_ref(x, cs, w, bias, silu=True):
    window = np.concatenate([cs, x[:, None, :]], axis=1).astype(np.float64)
    acc = (window * w.T[None]).sum(1) + bias
    return (acc / (1 + np.exp(-acc)) if silu else acc), window[:, 1:, :]


def run_conv(src, x, cs, w, bias, silu=True, **kw):
    (Bsz, C), K = x.shape, w.shape[1]
    k = metal_kernel(name="conv_update", input_names=["x", "conv_state", "w", "bias"],
                     output_names=["y", "new_state"], source=src)
    return k(inputs=[x, cs, w, bias], output_shapes=[(Bsz, C), (Bsz, K - 1, C)],
             output_dtypes=[np.float32] * 2, grid=(C, Bsz, 1), threadgroup=(min(C, 256), 1, 1),
             template=[("T", np.float32), ("C", C), ("K", K), ("SILU", silu)], **kw)


@pytest.mark.parametrize("silu", [True, False])
def test_conv_update(silu):
    x, cs, w, b = conv_inputs(3)
    y, ns = run_conv(CONV_SRC, x, cs, w, b, silu)
    yr, nsr = conv_ref(x, cs, w, b, silu)
    np.testing.assert_allclose(y, yr, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ns, nsr)  # pure data movement: exact


def test_numpy_in_numpy_out_and_mlx_in_mlx_out():
    x, cs, w, b = conv_inputs(3)
    y, _ = run_conv(CONV_SRC, x, cs, w, b)
    assert isinstance(y, np.ndarray)
    ym, _ = run_conv(CONV_SRC, *(mx.array(a) for a in (x, cs, w, b)))
    assert isinstance(ym, mx.array)
    np.testing.assert_array_equal(np.array(ym), y)


# ------------------------------------------------------- deliberate bugs found
def test_bug_missing_barrier():
    src = mutate(SSM_TG_SRC, "threadgroup_barrier(mem_flags::mem_threadgroup);", "")
    dims = dict(Bsz=1, H=2, G=1, P=4, N=128)
    with pytest.raises(MSLEmuError, match="depends on thread scheduling"):
        run_ssm(src, ssm_inputs(2, **dims), **dims, grid=(128, 4, 2), tg=(128, 1, 1))


def test_bug_barrier_in_divergent_branch():
    src = mutate(SSM_TG_SRC, "threadgroup_barrier(mem_flags::mem_threadgroup);",
                 "if (sg == 0) { threadgroup_barrier(mem_flags::mem_threadgroup); }")
    dims = dict(Bsz=1, H=2, G=1, P=4, N=128)
    with pytest.raises(MSLEmuError, match="must reach the barrier|deadlock"):
        run_ssm(src, ssm_inputs(2, **dims), **dims, grid=(128, 4, 2), tg=(128, 1, 1))


def test_bug_early_return_before_barrier():
    src = mutate(SSM_TG_SRC, "    threadgroup float partial[N / 32];",
                 "    threadgroup float partial[N / 32];\n    if (n >= 120) return;")
    dims = dict(Bsz=1, H=2, G=1, P=4, N=128)
    with pytest.raises(MSLEmuError, match="must reach the barrier|deadlock"):
        run_ssm(src, ssm_inputs(2, **dims), **dims, grid=(128, 4, 2), tg=(128, 1, 1))


def test_bug_off_by_one_loop_bound():
    src = mutate(SSM_SRC, "i < NPL;", "i <= NPL;")
    dims = dict(Bsz=1, H=2, G=1, P=4, N=64)
    with pytest.raises(MSLEmuError, match="out-of-bounds|race"):
        run_ssm(src, ssm_inputs(0, **dims), **dims)


def test_bug_simd_sum_in_divergent_branch_changes_result():
    # Metal semantics: lanes that skip the collective are inactive -> a partial sum
    src = mutate(SSM_SRC, "acc = simd_sum(acc);", "if (lane < 16) { acc = simd_sum(acc); }")
    dims = dict(Bsz=1, H=2, G=1, P=4, N=64)
    inp = ssm_inputs(0, **dims)
    y, _ = run_ssm(src, inp, **dims)
    assert not np.allclose(as_np(y), ssm_ref(*[inp[n] for n in SSM_INPUTS])[0], rtol=1e-3, atol=1e-3)


def test_bug_divergent_collectives():
    src = mutate(SSM_SRC, "acc = simd_sum(acc);",
                 "if (lane < 16) { acc = simd_sum(acc); } else { acc = simd_sum(acc * 1.0f); }")
    dims = dict(Bsz=1, H=2, G=1, P=4, N=64)
    with pytest.raises(MSLEmuError, match="divergent simd collective"):
        run_ssm(src, ssm_inputs(0, **dims), **dims)


def test_bug_wrong_group_index():
    src = mutate(SSM_SRC, "const uint g = h / (H / G);", "const uint g = h % G;")
    dims = dict(Bsz=1, H=4, G=2, P=4, N=32)
    inp = ssm_inputs(0, **dims)
    y, _ = run_ssm(src, inp, **dims)
    assert not np.allclose(as_np(y), ssm_ref(*[inp[n] for n in SSM_INPUTS])[0], rtol=1e-3, atol=1e-3)


def test_bug_conv_tap_off_by_one():
    src = mutate(CONV_SRC, "static_cast<float>(w[c * K + k])", "static_cast<float>(w[c * K + k + 1])")
    x, cs, w, b = conv_inputs(3)
    y, _ = run_conv(src, x, cs, w, b)
    assert not np.allclose(y, conv_ref(x, cs, w, b)[0], rtol=1e-3, atol=1e-3)


def test_wild_pointer_is_contained_with_isolate():
    # Raw pointers escape the bounds checks; isolate=True runs the launch in a
    # forked child so the crash is reported instead of killing the test run.
    k = metal_kernel(name="wild", input_names=["inp"], output_names=["out"],
                     source="device float* p = out; p[thread_position_in_grid.x * 100000000ull] = inp[0];")
    with pytest.raises(MSLEmuError, match="kernel crashed: SIGSEGV"):
        k(inputs=[np.ones(4, np.float32)], output_shapes=[(1,)], output_dtypes=[np.float32],
          grid=(4, 1, 1), threadgroup=(4, 1, 1), isolate=True, schedules=("forward",))


def test_bug_conv_state_shift_off_by_one():
    src = mutate(CONV_SRC, "new_state[(b * (K - 1) + k - 1) * C + c] = v;",
                 "new_state[(b * (K - 1) + k) * C + c] = v;")
    src = mutate(src, "new_state[(b * (K - 1) + K - 2) * C + c] = xv;",
                 "new_state[(b * (K - 1) + K - 1) * C + c] = xv;")
    with pytest.raises(MSLEmuError, match="out-of-bounds|race"):
        run_conv(src, *conv_inputs(3))


def test_bug_output_not_fully_written():
    src = mutate(CONV_SRC, "new_state[(b * (K - 1) + K - 2) * C + c] = xv;", "")
    _, ns = run_conv(src, *conv_inputs(3))
    assert np.isnan(ns).any()  # poisoned, never written


def test_bug_cross_threadgroup_read():
    src = CONV_SRC + "\n    if (c == 0 && b > 0) { y[b * C] = y[(b - 1) * C + 1]; }\n"
    with pytest.raises(MSLEmuError, match="race"):
        run_conv(src, *conv_inputs(3))


def test_bug_nonatomic_accumulate():
    k = metal_kernel(name="acc", input_names=["inp"], output_names=["out"],
                     source="out[0] += inp[thread_position_in_grid.x];")
    with pytest.raises(MSLEmuError, match="race"):
        k(inputs=[np.ones(64, np.float32)], output_shapes=[(1,)], output_dtypes=[np.float32],
          grid=(64, 1, 1), threadgroup=(32, 1, 1), init_value=0.0)


def test_atomic_accumulate_ok():
    src = "atomic_fetch_add_explicit(&out[0], inp[thread_position_in_grid.x], memory_order_relaxed);"
    k = metal_kernel(name="acc", input_names=["inp"], output_names=["out"], source=src,
                     atomic_outputs=True)
    (o,) = k(inputs=[np.ones(64, np.float32)], output_shapes=[(1,)], output_dtypes=[np.float32],
             grid=(64, 1, 1), threadgroup=(32, 1, 1), init_value=0.0)
    assert o[0] == 64


def test_bug_threadgroup_lost_update():
    src = """
        threadgroup float buf[1];
        if (thread_index_in_threadgroup == 0) { buf[0] = 0.0f; }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        buf[0] += inp[thread_position_in_grid.x];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (thread_index_in_threadgroup == 0) { out[threadgroup_position_in_grid.x] = buf[0]; }
    """
    k = metal_kernel(name="tgsum", input_names=["inp"], output_names=["out"], source=src)
    with pytest.raises(MSLEmuError, match="race: threadgroup memory"):
        k(inputs=[np.ones(64, np.float32)], output_shapes=[(2,)], output_dtypes=[np.float32],
          grid=(64, 1, 1), threadgroup=(32, 1, 1))


CUMSUM_SRC = """
    threadgroup float buf[L];
    const uint t = thread_position_in_threadgroup.x;
    const uint row = threadgroup_position_in_grid.y;
    buf[t] = static_cast<float>(dtA[row * L + t]);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (uint off = 1; off < L; off <<= 1) {
        const float v = t >= off ? buf[t - off] : 0.0f;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        buf[t] += v;
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[row * L + t] = buf[t];
"""


def run_cumsum(src, x, L):
    k = metal_kernel(name="chunk_cumsum", input_names=["dtA"], output_names=["out"], source=src)
    return k(inputs=[x], output_shapes=[x.shape], output_dtypes=[np.float32],
             grid=(L, x.size // L, 1), threadgroup=(L, 1, 1), template=[("L", L)])[0]


def test_chunk_cumsum():
    x = np.random.default_rng(6).standard_normal((6, 256)).astype(np.float32)
    np.testing.assert_allclose(run_cumsum(CUMSUM_SRC, x, 256), np.cumsum(x, -1), rtol=1e-4, atol=1e-4)


def test_bug_cumsum_missing_war_barrier():
    src = mutate(CUMSUM_SRC, "        threadgroup_barrier(mem_flags::mem_threadgroup);\n        buf[t] += v;",
                 "        buf[t] += v;")
    x = np.random.default_rng(6).standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(MSLEmuError, match="depends on thread scheduling"):
        run_cumsum(src, x, 64)


def test_writes_before_the_releasing_arrival_belong_to_the_old_epoch():
    # Regression: the last thread to reach a barrier writes a byte that another
    # thread rewrites after the barrier. Correct code; was reported as a race.
    src = """
        threadgroup float buf[64];
        const uint t = thread_index_in_threadgroup;
        buf[t] = inp[t];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        buf[63 - t] = 2.0f * buf[63 - t];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[t] = buf[t];
    """
    x = np.arange(64, dtype=np.float32)
    k = metal_kernel(name="epoch", input_names=["inp"], output_names=["out"], source=src)
    (o,) = k(inputs=[x], output_shapes=[(64,)], output_dtypes=[np.float32], grid=(64, 1, 1),
             threadgroup=(64, 1, 1))
    np.testing.assert_array_equal(o, 2 * x)


def test_threadgroup_limits():
    k = metal_kernel(name="big", input_names=["inp"], output_names=["out"],
                     source="threadgroup float buf[9000];\n buf[thread_index_in_threadgroup] = 1; out[0] = inp[0];")
    with pytest.raises(MSLEmuError, match="exceeds the 32768 byte limit"):
        k(inputs=[np.ones(4, np.float32)], output_shapes=[(1,)], output_dtypes=[np.float32],
          grid=(1, 1, 1), threadgroup=(1, 1, 1))
    k = metal_kernel(name="tg", input_names=["inp"], output_names=["out"], source="out[0] = inp[0];")
    with pytest.raises(MSLEmuError, match="exceeds the maximum of 1024"):
        k(inputs=[np.ones(4, np.float32)], output_shapes=[(1,)], output_dtypes=[np.float32],
          grid=(2048, 1, 1), threadgroup=(2048, 1, 1))


# ------------------------------------------------------- emulator semantics
def test_half_and_bfloat_conversions_match_mlx():
    src = """
        uint i = thread_position_in_grid.x;
        h[i] = static_cast<half>(inp[i]);
        bf[i] = static_cast<bfloat16_t>(inp[i]);
    """
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(2000) * 1e3, rng.standard_normal(2000) * 1e-6,
                        [65519, 65520, 1e9, -1e9, np.inf, -np.inf, 0, -0.0, 6e-8, 3e-8]])
    x = mx.array(np.pad(x, (0, -len(x) % 256)).astype(np.float32))
    k = metal_kernel(name="conv", input_names=["inp"], output_names=["h", "bf"], source=src)
    h, bf = k(inputs=[x], output_shapes=[x.shape] * 2, output_dtypes=[mx.float16, mx.bfloat16],
              grid=(x.size, 1, 1), threadgroup=(256, 1, 1), schedules=("forward",))
    assert mx.array_equal(h, x.astype(mx.float16)) and mx.array_equal(bf, x.astype(mx.bfloat16))


def test_simd_shuffle_and_prefix_semantics():
    src = """
        float v = inp[thread_position_in_grid.x];
        o1[thread_position_in_grid.x] = simd_shuffle_down(v, 3u);
        o2[thread_position_in_grid.x] = simd_prefix_exclusive_sum(v);
        o3[thread_position_in_grid.x] = simd_broadcast(v, 5u) + simd_max(v) + float(simd_is_first());
    """
    x = np.arange(64, dtype=np.float32)
    k = metal_kernel(name="shuf", input_names=["inp"], output_names=["o1", "o2", "o3"], source=src)
    o1, o2, o3 = k(inputs=[x], output_shapes=[(64,)] * 3, output_dtypes=[np.float32] * 3,
                   grid=(64, 1, 1), threadgroup=(64, 1, 1))
    lane = np.arange(64) % 32
    base = np.arange(64) - lane
    np.testing.assert_array_equal(o1, np.where(lane + 3 < 32, x + 3, x))
    np.testing.assert_array_equal(o2, [x[b:b + l].sum() for b, l in zip(base, lane)])
    np.testing.assert_array_equal(o3, base + 5 + base + 31 + (lane == 0))


def test_simd_sum_partial_simdgroup():
    # 48-thread threadgroups: the second simdgroup has 16 live lanes (Metal: sums those)
    src = "out[thread_position_in_grid.x] = simd_sum(inp[thread_position_in_grid.x]);"
    x = np.arange(96, dtype=np.float32)
    k = metal_kernel(name="psum", input_names=["inp"], output_names=["out"], source=src)
    (o,) = k(inputs=[x], output_shapes=[(96,)], output_dtypes=[np.float32], grid=(96, 1, 1),
             threadgroup=(48, 1, 1))
    exp = np.concatenate([np.full(32, x[0:32].sum()), np.full(16, x[32:48].sum()),
                          np.full(32, x[48:80].sum()), np.full(16, x[80:96].sum())])
    np.testing.assert_array_equal(o, exp)


def test_attributes_partial_threadgroup():
    src = """
        uint i = thread_position_in_grid.x;
        o[i * 4 + 0] = threads_per_threadgroup.x;
        o[i * 4 + 1] = threadgroup_position_in_grid.x;
        o[i * 4 + 2] = simdgroup_index_in_threadgroup;
        o[i * 4 + 3] = threads_per_grid.x;
    """
    k = metal_kernel(name="attrs", input_names=["a"], output_names=["o"], source=src)
    (o,) = k(inputs=[np.zeros(1, np.float32)], output_shapes=[(400,)], output_dtypes=[np.uint32],
             grid=(100, 1, 1), threadgroup=(64, 1, 1))
    o = o.reshape(100, 4)
    np.testing.assert_array_equal(o[:, 0], np.where(np.arange(100) < 64, 64, 36))
    np.testing.assert_array_equal(o[:, 1], np.arange(100) // 64)
    np.testing.assert_array_equal(o[:, 2], (np.arange(100) % 64) // 32)
    assert (o[:, 3] == 100).all()


def test_compile_error_is_reported_with_body_line():
    k = metal_kernel(name="bad", input_names=["a"], output_names=["o"],
                     source="uint i = thread_position_in_grid.x;\n o[i] = a[i] +;\n")
    with pytest.raises(MSLEmuError, match=r"body:2"):
        k(inputs=[np.zeros(4, np.float32)], output_shapes=[(4,)], output_dtypes=[np.float32],
          grid=(4, 1, 1), threadgroup=(4, 1, 1))


@pytest.mark.parametrize("idx_type", ["int64_t", "uint"])
def test_strided_input_elem_to_loc(idx_type):
    src = f"""
        uint elem = thread_position_in_grid.x;
        {idx_type} loc = elem_to_loc<int64_t>(elem, inp_shape, inp_strides, inp_ndim);
        out[elem] = metal::precise::exp(inp[loc]);
    """
    a = np.random.default_rng(7).standard_normal((3, 6)).astype(np.float32)
    a = np.tile(a[::2], (4, 1))[:, ::-2]  # non-contiguous, negative stride
    k = metal_kernel(name="myexp", input_names=["inp"], output_names=["out"], source=src,
                     ensure_row_contiguous=False)
    call = dict(inputs=[a], output_shapes=[a.shape], output_dtypes=[np.float32],
                grid=(a.size, 1, 1), threadgroup=(256, 1, 1))
    if idx_type == "uint":  # a negative offset wraps to ~4e9: caught as out-of-bounds
        with pytest.raises(MSLEmuError, match="out-of-bounds access inp"):
            k(**call)
        return
    (o,) = k(**call)
    np.testing.assert_allclose(o, np.exp(a), rtol=1e-6)


def test_padded_layout_catches_a_kernel_that_ignores_strides():
    src = "uint i = thread_position_in_grid.x; out[i] = inp[i * inp_strides[1]] + inp[i];"
    ok = "uint i = thread_position_in_grid.x; out[i] = 2.0f * inp[i * inp_strides[1]];"
    a = mx.arange(8, dtype=mx.float32).reshape(1, 8)
    for body, good in [(ok, True), (src, False)]:
        k = metal_kernel(name="strided", input_names=["inp"], output_names=["out"], source=body,
                         ensure_row_contiguous=False, layout="padded")
        (o,) = k(inputs=[a], output_shapes=[(8,)], output_dtypes=[mx.float32], grid=(8, 1, 1),
                 threadgroup=(8, 1, 1))
        assert mx.array_equal(o, 2 * a[0]).item() == good


# ------------------------------------------------------------ simdgroup_matrix
MM_SRC = """
    // out = A @ B^T + 1 per simdgroup (8x8 tiles at 64 * sg), B loaded transposed;
    // then, through threadgroup memory loaded transposed (each lane reads other
    // lanes' elements), out2 = (diag(d) @ out^T / 2)^T.
    threadgroup float tile[4 * 64];
    const uint sg = simdgroup_index_in_threadgroup;
    simdgroup_float8x8 a, b, c;
    simdgroup_load(a, A + 64 * sg, 8);
    simdgroup_load(b, Bm, 16, ulong2(8 * (sg % 2), 0), true);
    c = make_filled_simdgroup_matrix<float, 8>(1.0f);
    simdgroup_multiply_accumulate(c, a, b, c);
    simdgroup_store(c, out + 64 * sg, 8);
    simdgroup_store(c, &tile[64 * sg], 8);
    simdgroup_barrier(mem_flags::mem_threadgroup);
    simdgroup_float8x8 t, d(dscale[0]), r;
    simdgroup_load(t, &tile[64 * sg], 8, ulong2(0, 0), true);
    simdgroup_multiply(r, d, t);
    r.thread_elements()[0] *= 0.5f;
    r.thread_elements()[1] *= 0.5f;
    simdgroup_store(r, out2 + 64 * sg, 8, ulong2(0, 0), true);
"""


def run_mm(src, **kw):
    rng = np.random.default_rng(11)
    A = rng.standard_normal((4, 8, 8)).astype(np.float32)
    Bm = rng.standard_normal((8, 16)).astype(np.float32)
    k = metal_kernel(name="mm", input_names=["A", "Bm", "dscale"], output_names=["out", "out2"],
                     source=src, header="#include <metal_simdgroup_matrix>\n")
    outs = k(inputs=[A, Bm, np.array([3.0], np.float32)], output_shapes=[(4, 8, 8)] * 2,
             output_dtypes=[np.float32] * 2, grid=(128, 1, 1), threadgroup=(128, 1, 1), **kw)
    return A, Bm, outs


def test_simdgroup_matrix_ops():
    A, Bm, (out, out2) = run_mm(MM_SRC)
    Bt = np.stack([Bm[:, 8 * (s % 2): 8 * (s % 2) + 8].T for s in range(4)])  # (x, y) origin
    ref = A @ Bt + 1
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out2, 1.5 * ref, rtol=1e-5, atol=1e-5)


def test_bug_simdgroup_store_then_load_without_barrier():
    src = mutate(MM_SRC, "simdgroup_barrier(mem_flags::mem_threadgroup);", "")
    with pytest.raises(MSLEmuError, match="depends on thread scheduling"):
        run_mm(src)


def test_bug_relying_on_the_simdgroup_matrix_layout():
    # Metal leaves the element-to-lane assignment unspecified: positional use of
    # thread_elements() gives results that change with the emulated layout.
    src = mutate(MM_SRC, "r.thread_elements()[0] *= 0.5f;",
                 "r.thread_elements()[0] *= thread_index_in_simdgroup == 0 ? 0.0f : 0.5f;")
    with pytest.raises(MSLEmuError, match="depends on thread scheduling"):
        run_mm(src)


def test_bug_simdgroup_matrix_with_missing_lanes():
    src = mutate(MM_SRC, "    simdgroup_float8x8 a, b, c;",
                 "    if (thread_index_in_simdgroup == 31 && sg == 1) return;\n    simdgroup_float8x8 a, b, c;")
    with pytest.raises(MSLEmuError, match="31 of 32 lanes"):
        run_mm(src)


# ------------------------------------------------------------------- lint
def test_lint_flags_cpp_that_metal_rejects():
    body = """
        static float cache[4];
        double d = std::exp(1.0);
        auto v = y[0];
        float4 q = p.xyz;
        #include "helpers.h"
    """
    msgs = [m for _, m in msl_emu.lint(body)]
    for expected in ["static local", "no double", "std::", "explicit type", "swizzles", "header="]:
        assert any(expected in m for m in msgs), (expected, msgs)
    hdr = "#include <metal_simdgroup_matrix>\n#include <vector>\ninline float f(const device float* p) { return p[0]; }\n"
    found = msl_emu.lint("", hdr)
    assert [s for s, m in found if "Metal's own headers" in m] == ["error"]
    assert [s for s, m in found if "raw `device T*`" in m] == ["warn"]
    assert msl_emu.lint(CONV_SRC) == []
