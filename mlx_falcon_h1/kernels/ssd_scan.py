"""Chunked SSD scan: the Mamba2 recurrence over a whole prompt chunk.

Legend: B batch, L tokens, H SSM heads, P head dim, G groups, N state size,
Q chunk length, c number of chunks. Head h reads group h // (H / G).

The recurrence, per head (state S is P x N):
    S_t = exp(dt_t * A) * S_{t-1} + dt_t * x_t (outer) B_t
    y_t = S_t @ C_t + D * x_t
The chunked ("state space duality") form computes the same thing with matmuls:
inside each chunk of Q tokens the output is a masked, decayed attention-like
product; between chunks only the P x N state is carried. Memory is linear in L
(the Q x Q decay blocks are B*H*L*Q floats); nothing loops over tokens or chunks
in Python. Follows Listing 1 of Dao & Gu 2024 ("Transformers are SSMs") and the
segment-sum of transformers' modeling_falcon_h1.py.

`ssd_scan_reference` is the pure-MLX oracle; `ssd_scan_kernel` the same scan as
one Metal dispatch; `ssd_scan` picks between them. The three share signature
and docstring.

Metal kernel
------------
Same chunked decomposition, in 8x8 simdgroup matrix products (fp32
`simdgroup_float8x8`, every M-series GPU), with the state carried in registers
from chunk to chunk instead of materialised per chunk:
- Threadgroup: 128 threads = 4 simdgroups, one per (block of 32 rows of P, head
  h, batch b); grid (128 * ceil(P / 32), H, B). Simdgroup s owns rows
  p0 + 8s .. p0 + 8s + 7 and keeps their state, transposed, as N/8 register
  tiles (2N floats per lane).
- It walks the prompt in chunks of 32 tokens (its own chunk, not
  `chunk_size`: the math is the same recurrence and chunk_size only moves
  rounding). Per chunk: simdgroup 0 computes dt A and its in-chunk prefix and
  suffix sums with simd_prefix sums; the threadgroup stages dt x for its rows
  (and dt x decayed to the chunk's end); then, N in slices of 32 staged B and C
  columns: CB = C B^T (the 10 lower 8x8 tiles, spread over the simdgroups),
  Z = C S^T from the entering state, S = exp(sum dA) S + B^T (decayed dt x).
  Then M = CB * exp(segment sums of dA) (causal), and
  y = diag(exp(cum dA)) Z + M (dt x) + D x.
- Registers: the state is 2N floats per lane (64 at N = 256) plus ~24 for
  accumulators and operands, so few simdgroups fit per core; the MMAs keep
  the ALUs busy regardless (an estimate: selfcheck times it on a Mac).
- Threadgroup memory ~21.5 KB (B, C slices 8 KB, reused for M; dt x, decayed
  dt x and y tiles 4 KB each; the diagonal exp tiles 1 KB). Per chunk
  5 + N/16 threadgroup barriers. Decays are exp of sums of dA <= 0 computed
  directly (segment sums), never differences of large cumulative sums.

Work per chunk of 32 tokens and 32 rows: CB 1280 N, C S^T 2048 N, state update
2048 N, outputs ~57K FLOP; for Falcon-H1-7B (H=24, P=128, N=256) ~4.3 MFLOP per
token per layer (the reference's chunked form: ~3.6). Memory per token per
layer: x (H*P), B and C (2*G*N) in the activation dtype, dt, y (H*P floats):
~20 KB; B and C are re-read from cache by each of the H*P/32 threadgroups.
Roofline (an estimate on paper, not a measurement): ~200 FLOP/byte, so
compute-bound; at half of an M3/M4 Max's ~14-18 fp32 TFLOPS, ~0.5-0.6 us per
token per layer, ~0.2 s for an 8K-token prompt through 44 layers (~2-3% of the
prefill's matmuls); ~4x that on a base M-chip. The state (8*H*P*N bytes) is read
and written once per call, not once per chunk.
"""

import math
from typing import Optional, Tuple

import mlx.core as mx

from . import build_metal_kernel, kernels_enabled, with_reference_vjp
from .descriptor import KernelOp, RandomInputs, register
from .elementwise import exp
from .runtime_check import kernel_allowed
from .ssm_step import discretize


def _segment_sum(a: mx.array) -> mx.array:
    """(..., T) -> (..., T, T) with out[i, j] = sum(a[j+1 : i+1]) for i >= j, else -inf.

    Built by a masked cumulative sum instead of cumsum(a)[i] - cumsum(a)[j]:
    the difference of two large cumulative sums loses the small segments' digits
    in float32, and exp() of the segment is what the output multiplies by.
    """
    t = a.shape[-1]
    rows = mx.arange(t)[:, None]
    cols = mx.arange(t)[None]
    terms = mx.where(rows > cols, a[..., :, None], 0.0)  # [i, j] = a[i] for i > j
    sums = mx.cumsum(terms, axis=-2)
    return mx.where(rows >= cols, sums, -mx.inf)


def ssd_scan_reference(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    state: Optional[mx.array],
    chunk_size: int,
) -> Tuple[mx.array, mx.array]:
    """Run the SSM over L tokens from `state`; all arithmetic in float32.

    Args:
        x: (B, L, H, P) conv outputs for the SSM input.
        dt: (B, L, H) float32 step sizes, already softplus'd and clipped.
        A: (H,) float32, negative (-exp(A_log)).
        B: (B, L, G, N) input projection of the state.
        C: (B, L, G, N) output projection of the state.
        D: (H,) skip connection.
        state: (B, H, P, N) float32 state before the first token, or None (zeros).
        chunk_size: Q, tokens per chunk.

    Returns:
        y: (B, L, H, P) float32.
        state: (B, H, P, N) float32 state after the last token.
    """
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    per_group = heads // groups
    q = chunk_size
    pad = -length % q
    chunks = (length + pad) // q

    x = x.astype(mx.float32)
    B = B.astype(mx.float32)
    C = C.astype(mx.float32)
    skip = x * D.astype(mx.float32)[:, None]
    # Padded steps have dt = 0: no decay and no input, so they leave the state
    # exactly as it was and only produce outputs that are cut off below.
    if pad:
        widths = [(0, 0), (0, pad)]
        x = mx.pad(x, widths + [(0, 0), (0, 0)])
        dt = mx.pad(dt, widths + [(0, 0)])
        B = mx.pad(B, widths + [(0, 0), (0, 0)])
        C = mx.pad(C, widths + [(0, 0), (0, 0)])

    # Token-major chunks; a group's heads side by side (R = H/G heads of P
    # channels: R*P columns), so a group's B and C serve all its heads in one
    # matmul wherever the decay does not depend on the head.
    xdt = (x * dt[..., None]).reshape(batch, chunks, q, heads, head_dim)  # (B, c, Q, H, P)
    B = B.reshape(batch, chunks, q, groups, n).transpose(0, 1, 3, 2, 4)  # (B, c, G, Q, N)
    C = C.reshape(batch, chunks, q, groups, n).transpose(0, 1, 3, 2, 4)  # (B, c, G, Q, N)
    dA = (dt * A).reshape(batch, chunks, q, heads).transpose(0, 1, 3, 2)  # (B, c, H, Q)
    dA_cumsum = mx.cumsum(dA, axis=-1)

    # 1. Within each chunk: y_t += sum_{s<=t} (C_t . B_s) exp(sum dA(s, t]) dt_s x_s,
    #    per head (the decay is the head's): (Q x Q) @ (Q x P) for each chunk and head.
    decay = exp(_segment_sum(dA)).reshape(batch, chunks, groups, per_group, q, q)
    scores = (C @ B.swapaxes(-1, -2))[:, :, :, None] * decay  # (B, c, G, R, Q, Q)
    xdt_heads = xdt.reshape(batch, chunks, q, groups, per_group, head_dim)
    y = scores @ xdt_heads.transpose(0, 1, 3, 4, 2, 5)  # (B, c, G, R, Q, P)
    y = y.transpose(0, 1, 4, 2, 3, 5).reshape(batch, chunks, q, heads, head_dim)

    # 2. Each chunk's own contribution to the state at its end: decay dt x to the
    #    chunk's end, then one (R*P x Q) @ (Q x N) matmul per chunk and group.
    decay_to_end = exp(dA_cumsum[..., -1:] - dA_cumsum).swapaxes(-1, -2)  # (B, c, Q, H)
    xdt_end = (xdt * decay_to_end[..., None]).reshape(batch, chunks, q, groups, -1)
    chunk_states = xdt_end.transpose(0, 1, 3, 4, 2) @ B  # (B, c, G, R*P, N) = (B, c, H, P, N)

    # 3. Carry states across chunks: the state entering chunk z is
    #    sum_{j<=z} exp(decay of chunks j..z-1) * (state made by chunk j-1).
    if state is None:
        state = mx.zeros((batch, heads, head_dim, n), dtype=mx.float32)
    made = mx.concatenate(
        [state.astype(mx.float32).reshape(batch, 1, heads, -1),
         chunk_states.reshape(batch, chunks, heads, -1)],
        axis=1,
    ).swapaxes(1, 2)  # (B, H, c+1, P*N)
    chunk_decay = mx.pad(dA_cumsum[..., -1].swapaxes(1, 2), [(0, 0), (0, 0), (1, 0)])
    carry = exp(_segment_sum(chunk_decay))  # (B, H, c+1, c+1)
    entering = carry @ made  # (B, H, c+1, P*N)
    final_state = entering[:, :, -1].reshape(batch, heads, head_dim, n)
    entering = entering[:, :, :-1].swapaxes(1, 2).reshape(batch, chunks, groups, -1, n)

    # 4. Output from the state entering each chunk, decayed to each position:
    #    one (Q x N) @ (N x R*P) matmul per chunk and group.
    y_state = (C @ entering.swapaxes(-1, -2)).reshape(batch, chunks, groups, q, per_group, head_dim)
    y_state = y_state.transpose(0, 1, 3, 2, 4, 5).reshape(batch, chunks, q, heads, head_dim)
    y = y + y_state * exp(dA_cumsum).swapaxes(-1, -2)[..., None]

    y = y.reshape(batch, chunks * q, heads, head_dim)
    # A copy, not a view: a view would keep all of `entering` alive in the cache.
    return y[:, :length] + skip, mx.contiguous(final_state)


# ---------------------------------------------------------------------------
# Metal kernel
# ---------------------------------------------------------------------------
_CHUNK = 32  # tokens per kernel chunk: one simdgroup prefix sum, 4 MMA tiles (SSD_Q below)
_ROWS = 32  # rows of P per threadgroup: 4 simdgroups x 8 (SSD_PB below)
_THREADS = 128
_MAX_N = 256  # state tiles per lane: N/8 x 2 floats = 64 registers at N = 256
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

_SOURCE = """
    // x: [B, L, H, P] T; dt: [B, L, H] float; A, D: [H] float; B, C: [B, L, G, N] T;
    // state: [B, H, P, N] float; all read through their strides.
    // y: [B, L, H, P] float, state_out: [B, H, P, N] float.
    constexpr int Q = 32;   // SSD_Q: tokens per chunk (= SIMD width: one prefix sum)
    constexpr int PB = 32;  // SSD_PB: rows per threadgroup, 8 per simdgroup
    constexpr int NS = 32;  // state columns per staged slice of B and C
    const int sg = simdgroup_index_in_threadgroup;
    const int lane = thread_index_in_simdgroup;
    const int tid = thread_index_in_threadgroup;
    const int L = x_shape[1];
    const int H = x_shape[2];
    const int P = x_shape[3];
    const int G = B_shape[2];
    const int p0 = threadgroup_position_in_grid.x * PB;
    const int h = threadgroup_position_in_grid.y;
    const int b = threadgroup_position_in_grid.z;
    const int g = h / (H / G);
    const int pr = p0 + 8 * sg;  // this simdgroup's first row
    const bool rows_ok = pr < P;  // P % 8 == 0: all 8 rows or none
    const float A_h = A[h * A_strides[0]];
    const float D_h = D[h * D_strides[0]];
    const int64_t x_bh = b * x_strides[0] + h * x_strides[2];   // x[b, 0, h, 0]
    const int64_t dt_bh = b * dt_strides[0] + h * dt_strides[2];
    const int64_t B_bg = b * B_strides[0] + g * B_strides[2];   // B[b, 0, g, 0]
    const int64_t C_bg = b * C_strides[0] + g * C_strides[2];
    const int64_t s_bh = b * state_strides[0] + h * state_strides[1];

    threadgroup float sm_bc[2 * Q * NS];  // B slice [Q][NS], C slice [Q][NS]; then M [Q][Q]
    threadgroup float sm_xdt[Q * PB];     // dt x [Q][PB]
    threadgroup float sm_xend[Q * PB];    // dt x exp(sum dA after t in the chunk) [Q][PB]
    threadgroup float sm_y[Q * PB];       // y tiles [Q][PB]; first the entering state [NS][PB]
    threadgroup float sm_ediag[4 * 64];   // diagonal tiles of exp(cumsum dA), [4][8][8]
    threadgroup float sm_dt[Q];
    threadgroup float sm_da[Q];
    threadgroup float sm_end[Q];
    threadgroup float sm_decay[1];        // exp(sum of the chunk's dA)

    for (int i = tid; i < 4 * 64; i += 4 * 32) {
        sm_ediag[i] = 0.0f;  // off-diagonal zeros, never rewritten
    }

    // The entering state, transposed: S[k] (n x p) = state[b, h, pr..pr+7, 8k..8k+7]^T.
    simdgroup_float8x8 S[N / 8];
    for (int n0 = 0; n0 < N; n0 += NS) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int i = tid; i < NS * PB; i += 4 * 32) {
            const int pc = i / NS, nl = i % NS;  // n fastest: contiguous state reads
            const int p = p0 + pc, n = n0 + nl;
            sm_y[nl * PB + pc] = p < P && n < N
                ? state[s_bh + p * state_strides[2] + n * state_strides[3]] : 0.0f;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (rows_ok) {
            for (int kk = 0; kk < NS / 8 && n0 + 8 * kk < N; ++kk) {
                simdgroup_load(S[n0 / 8 + kk], sm_y + 8 * kk * PB + 8 * sg, PB);
            }
        }
    }

    for (int c0 = 0; c0 < L; c0 += Q) {
        const int nq = min(Q, L - c0);  // real tokens; the rest have dt = 0, x = B = C = 0

        // (1) dA = dt A of the chunk's tokens, its inclusive prefix sums (exp on
        //     the diagonal tiles) and exclusive suffix sums (decay to the chunk's end).
        if (sg == 0) {
            const float dtv = lane < nq ? dt[dt_bh + (c0 + lane) * dt_strides[1]] : 0.0f;
            const float da = dtv * A_h;
            const float cum = simd_prefix_inclusive_sum(da);
            const float after = simd_prefix_exclusive_sum(simd_shuffle(da, ushort(Q - 1 - lane)));
            sm_dt[lane] = dtv;
            sm_da[lane] = da;
            sm_end[Q - 1 - lane] = metal::exp(after);
            sm_ediag[64 * (lane / 8) + 9 * (lane % 8)] = metal::exp(cum);
            if (lane == Q - 1) {
                sm_decay[0] = metal::exp(cum);
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // (2) dt x and dt x decayed to the chunk's end, for the block's rows.
        for (int i = tid; i < Q * PB; i += 4 * 32) {
            const int t = i / PB, pc = i % PB;
            const int p = p0 + pc;
            const float xv = t < nq && p < P
                ? static_cast<float>(x[x_bh + (c0 + t) * x_strides[1] + p * x_strides[3]]) : 0.0f;
            const float xdt = xv * sm_dt[t];
            sm_xdt[i] = xdt;
            sm_xend[i] = xdt * sm_end[t];
        }
        const float decay = sm_decay[0];
        threadgroup_barrier(mem_flags::mem_threadgroup);

        simdgroup_float8x8 Z[4];   // C S^T: the entering state's output, rows t
        simdgroup_float8x8 XE[4];  // decayed dt x, this simdgroup's 8 columns
        simdgroup_float8x8 CB[3];  // this simdgroup's lower tiles of C B^T
        for (int i = 0; i < 4; ++i) {
            Z[i] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
            simdgroup_load(XE[i], sm_xend + 8 * i * PB + 8 * sg, PB);
        }
        for (int q = 0; q < 3; ++q) {
            CB[q] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
        }

        // (3) N in slices of NS columns of B and C.
        for (int n0 = 0; n0 < N; n0 += NS) {
            if (n0 > 0) {
                threadgroup_barrier(mem_flags::mem_threadgroup);  // previous slice consumed
            }
            for (int i = tid; i < Q * NS; i += 4 * 32) {
                const int t = i / NS, nl = i % NS;
                const int n = n0 + nl;
                const bool ok = t < nq && n < N;
                const int64_t tok = c0 + t;
                sm_bc[i] = ok ? static_cast<float>(B[B_bg + tok * B_strides[1] + n * B_strides[3]]) : 0.0f;
                sm_bc[Q * NS + i] =
                    ok ? static_cast<float>(C[C_bg + tok * C_strides[1] + n * C_strides[3]]) : 0.0f;
            }
            threadgroup_barrier(mem_flags::mem_threadgroup);
            for (int kk = 0; kk < NS / 8 && n0 + 8 * kk < N; ++kk) {
                // CB[ti][tj] += C[ti rows] B[tj rows]^T: lower tile idx = ti (ti+1) / 2 + tj,
                // simdgroup sg takes idx = sg, sg + 4, sg + 8 (3, 3, 2, 2 tiles).
                for (int q = 0; q < 3; ++q) {
                    const int idx = sg + 4 * q;
                    if (idx < 10) {
                        const int ti = idx < 1 ? 0 : idx < 3 ? 1 : idx < 6 ? 2 : 3;
                        const int tj = idx - ti * (ti + 1) / 2;
                        simdgroup_float8x8 ct, bt;
                        simdgroup_load(ct, sm_bc + Q * NS + 8 * ti * NS + 8 * kk, NS);
                        simdgroup_load(bt, sm_bc + 8 * tj * NS + 8 * kk, NS, ulong2(0, 0), true);
                        simdgroup_multiply_accumulate(CB[q], ct, bt, CB[q]);
                    }
                }
                if (rows_ok) {
                    const int k = n0 / 8 + kk;
                    for (int i = 0; i < 4; ++i) {  // Z += C S^T with the entering state
                        simdgroup_float8x8 ct;
                        simdgroup_load(ct, sm_bc + Q * NS + 8 * i * NS + 8 * kk, NS);
                        simdgroup_multiply_accumulate(Z[i], ct, S[k], Z[i]);
                    }
                    S[k].thread_elements()[0] *= decay;  // uniform scale: layout-free
                    S[k].thread_elements()[1] *= decay;
                    for (int j = 0; j < 4; ++j) {  // S += B^T (decayed dt x)
                        simdgroup_float8x8 bt;
                        simdgroup_load(bt, sm_bc + 8 * j * NS + 8 * kk, NS, ulong2(0, 0), true);
                        simdgroup_multiply_accumulate(S[k], bt, XE[j], S[k]);
                    }
                }
            }
        }

        // (4) M[t][s] = CB[t][s] exp(sum dA(s..t]) for s <= t, else 0 (reuses sm_bc).
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int q = 0; q < 3; ++q) {
            const int idx = sg + 4 * q;
            if (idx < 10) {
                const int ti = idx < 1 ? 0 : idx < 3 ? 1 : idx < 6 ? 2 : 3;
                const int tj = idx - ti * (ti + 1) / 2;
                simdgroup_store(CB[q], sm_bc + 8 * ti * Q + 8 * tj, Q);
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        for (int i = tid; i < Q * Q; i += 4 * 32) {
            const int t = i / Q, s = i % Q;
            float m = 0.0f;
            if (s <= t) {
                float seg = 0.0f;  // a direct segment sum: no cancellation
                for (int k = s + 1; k <= t; ++k) {
                    seg += sm_da[k];
                }
                m = sm_bc[i] * metal::exp(seg);
            }
            sm_bc[i] = m;
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);

        // (5) y = diag(exp(cum dA)) Z + M (dt x) + D x, for this simdgroup's rows.
        if (rows_ok) {
            for (int i = 0; i < 4; ++i) {
                simdgroup_float8x8 e, acc;
                simdgroup_load(e, sm_ediag + 64 * i, 8);
                simdgroup_multiply(acc, e, Z[i]);
                for (int j = 0; j <= i; ++j) {
                    simdgroup_float8x8 m, xd;
                    simdgroup_load(m, sm_bc + 8 * i * Q + 8 * j, Q);
                    simdgroup_load(xd, sm_xdt + 8 * j * PB + 8 * sg, PB);
                    simdgroup_multiply_accumulate(acc, m, xd, acc);
                }
                simdgroup_store(acc, sm_y + 8 * i * PB + 8 * sg, PB);
            }
            simdgroup_barrier(mem_flags::mem_threadgroup);
            for (int e = lane; e < Q * 8; e += 32) {
                const int t = e / 8, pc = 8 * sg + e % 8;
                if (t < nq) {
                    const int p = p0 + pc;
                    const float xv =
                        static_cast<float>(x[x_bh + (c0 + t) * x_strides[1] + p * x_strides[3]]);
                    y[((int64_t(b) * L + c0 + t) * H + h) * P + p] = sm_y[t * PB + pc] + D_h * xv;
                }
            }
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);  // the next chunk reuses the staging
    }

    // (6) The state after the last token, transposed back: state_out[b, h, p, n].
    if (rows_ok) {
        for (int k = 0; k < N / 8; ++k) {
            simdgroup_store(S[k], state_out + ((int64_t(b) * H + h) * P + pr) * N + 8 * k, N,
                            ulong2(0, 0), true);
        }
    }
"""

KERNEL_SPEC = dict(
    name="falcon_h1_ssd_scan",
    input_names=["x", "dt", "A", "B", "C", "D", "state"],
    output_names=["y", "state_out"],
    source=_SOURCE,
    header="#include <metal_simdgroup_matrix>\n",
    ensure_row_contiguous=False,
)


_KERNEL = build_metal_kernel(KERNEL_SPEC)


def _fits_kernel(x, dt, A, B, C, D, state) -> bool:
    """Whether ssd_scan can take the Metal kernel for this call."""
    batch, length, heads, head_dim = x.shape
    groups, n = B.shape[2], B.shape[3]
    return (
        _KERNEL is not None
        and kernels_enabled()
        and length >= 1
        and x.dtype in _FLOATS
        and B.dtype == x.dtype
        and C.dtype == x.dtype
        and dt.dtype == mx.float32
        and A.dtype == mx.float32
        and (state is None or state.dtype == mx.float32)
        and head_dim % 8 == 0
        and n % 8 == 0
        and n <= _MAX_N
        and heads % groups == 0
        and B.shape == C.shape == (batch, length, groups, n)
    )


def _launch(kernel, x, dt, A, B, C, D, state):
    batch, length, heads, head_dim = x.shape
    n = B.shape[3]
    return tuple(
        kernel(
            inputs=[x, dt, A, B, C, D, state],
            template=[("T", x.dtype), ("N", n)],
            grid=(_THREADS * -(-head_dim // _ROWS), heads, batch),
            threadgroup=(_THREADS, 1, 1),
            output_shapes=[x.shape, (batch, heads, head_dim, n)],
            output_dtypes=[mx.float32, mx.float32],
        )
    )


def ssd_scan_kernel(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    state: Optional[mx.array],
    chunk_size: int,
) -> Tuple[mx.array, mx.array]:
    # docstring: ssd_scan_reference's (assigned below)
    if _KERNEL is None:
        raise RuntimeError("ssd_scan_kernel needs Metal; use ssd_scan")
    batch, _, heads, head_dim = x.shape
    if state is None:
        state = mx.zeros((batch, heads, head_dim, B.shape[3]), dtype=mx.float32)
    D = D.astype(mx.float32) if D.dtype != mx.float32 else D

    def reference_fn(*a):
        return ssd_scan_reference(*a, chunk_size)

    fn = with_reference_vjp(lambda *a: _launch(_KERNEL, *a), reference_fn)
    return fn(x, dt, A, B, C, D, state)


def ssd_scan(
    x: mx.array,
    dt: mx.array,
    A: mx.array,
    B: mx.array,
    C: mx.array,
    D: mx.array,
    state: Optional[mx.array],
    chunk_size: int,
) -> Tuple[mx.array, mx.array]:
    # docstring: ssd_scan_reference's (assigned below)
    if _fits_kernel(x, dt, A, B, C, D, state) and kernel_allowed(KERNEL_OP, dict(
            heads=x.shape[2], head_dim=x.shape[3], groups=B.shape[2], n=B.shape[3], dtype=x.dtype)):
        return ssd_scan_kernel(x, dt, A, B, C, D, state, chunk_size)
    return ssd_scan_reference(x, dt, A, B, C, D, state, chunk_size)


ssd_scan_kernel.__doc__ = ssd_scan.__doc__ = ssd_scan_reference.__doc__


def _random_inputs(sizes, batch=1, length=None, seed=0):
    """Random ssd_scan arguments; sizes: heads, head_dim, groups, n, dtype. 40
    tokens by default: more than one 32-token kernel chunk, so the check covers
    the state carried between chunks."""
    draw, dtype, length = RandomInputs(seed), sizes["dtype"], length or 40
    h, p, g, n = (sizes[f] for f in ("heads", "head_dim", "groups", "n"))
    a_log = draw.a_log(h)
    dt, A = discretize(draw.normal(batch, length, h), draw.normal(h), a_log, (0.0, math.inf))
    return dict(x=draw.normal(batch, length, h, p, dtype=dtype), dt=dt, A=A,
                B=draw.normal(batch, length, g, n, dtype=dtype),
                C=draw.normal(batch, length, g, n, dtype=dtype), D=draw.normal(h),
                state=draw.normal(batch, h, p, n), chunk_size=32)


KERNEL_OP = register(KernelOp(
    name="ssd_scan", spec=KERNEL_SPEC, kernel=ssd_scan_kernel, reference=ssd_scan_reference,
    make_inputs=_random_inputs,
    # float32 outputs from the same (exactly representable) inputs in every
    # dtype: only the summation order and exp differ.
    tolerance={mx.float32: 2e-5, mx.float16: 2e-5, mx.bfloat16: 2e-5}))
