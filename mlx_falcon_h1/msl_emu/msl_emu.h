// msl_emu.h -- run the Metal Shading Language subset used by
// mx.fast.metal_kernel bodies as C++20 on a CPU.
//
// Execution model: every GPU thread of a threadgroup is a user-level fiber
// (ucontext) with its own stack; all fibers run on ONE OS thread. A fiber runs
// until it reaches a synchronisation point (threadgroup_barrier, a simd_* /
// quad_* collective, simdgroup_barrier) or returns. Barriers and collectives
// are therefore exact (every participating lane really contributes), the
// interleaving between sync points is chosen by a schedule policy
// (forward / reverse / random) so missing-barrier bugs show up as differing
// results, and deadlocks / divergent barriers / divergent collectives are
// detected and reported instead of hanging.
//
// Threadgroups run one after another. Device outputs written by the kernel
// are tracked per element (writer thread, barrier epoch) to flag write/write
// and read-after-write races between threads, reads of never-written outputs,
// and out-of-bounds indexing through kernel buffer parameters.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <source_location>
#include <string>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------------------
// Address-space qualifiers and attributes: no meaning on a CPU.
// (threadgroup *declarations* are rewritten by the Python driver into
// msl::tg_alloc<T>() calls so they are shared by the threads of a group.)
#define device
#define constant
#define thread
#define threadgroup
#define ray_data
#define object_data
#define METAL_FUNC inline
#define MTL_CONST
#define STEEL_CONST static constexpr

namespace msl {

// ===========================================================================
// 16-bit float types (software, round-to-nearest-even; each op rounds).
// ===========================================================================
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t f32_to_f16(float f) {
  const uint32_t f32infty = 255u << 23;
  const uint32_t f16max = (127u + 16u) << 23;
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  uint32_t fu = f2u(f);
  uint32_t sign = fu & 0x80000000u;
  fu ^= sign;
  uint16_t o;
  if (fu >= f16max) {
    o = (fu > f32infty) ? 0x7e00 : 0x7c00;
  } else if (fu < (113u << 23)) {
    float ff = u2f(fu) + u2f(denorm_magic);
    o = (uint16_t)(f2u(ff) - denorm_magic);
  } else {
    uint32_t mant_odd = (fu >> 13) & 1u;
    fu += ((uint32_t)(15 - 127) << 23) + 0xfffu;
    fu += mant_odd;
    o = (uint16_t)(fu >> 13);
  }
  return (uint16_t)(o | (sign >> 16));
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;
  uint32_t o = (uint32_t)(h & 0x7fff) << 13;
  uint32_t exp = shifted_exp & o;
  o += (uint32_t)(127 - 15) << 23;
  if (exp == shifted_exp) {
    o += (uint32_t)(128 - 16) << 23;
  } else if (exp == 0) {
    o += 1u << 23;
    o = f2u(u2f(o) - u2f(113u << 23));
  }
  o |= (uint32_t)(h & 0x8000) << 16;
  return u2f(o);
}
inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float bf16_to_f32(uint16_t b) { return u2f((uint32_t)b << 16); }

template <int Kind>  // 0 = IEEE half, 1 = bfloat16
struct lowp {
  uint16_t bits;
  static float to_f(uint16_t b) { return Kind == 0 ? f16_to_f32(b) : bf16_to_f32(b); }
  static uint16_t from_f(float f) { return Kind == 0 ? f32_to_f16(f) : f32_to_bf16(f); }
  lowp() = default;
  template <class A, std::enable_if_t<std::is_arithmetic_v<A>, int> = 0>
  constexpr lowp(A a) : bits(from_f((float)a)) {}
  template <int K2, std::enable_if_t<K2 != Kind, int> = 0>
  explicit lowp(lowp<K2> o) : bits(from_f((float)o)) {}
  operator float() const { return to_f(bits); }
  static lowp from_bits(uint16_t b) { lowp r; r.bits = b; return r; }
};
using half_t = lowp<0>;
using bfloat_t = lowp<1>;

template <class T> struct is_lowp : std::false_type {};
template <int K> struct is_lowp<lowp<K>> : std::true_type {};
template <class T> inline constexpr bool is_lowp_v = is_lowp<std::remove_cv_t<T>>::value;

// result type of a binary op involving at least one lowp operand
template <class A, class B, class = void> struct lowp_res { using type = void; };
template <int K> struct lowp_res<lowp<K>, lowp<K>> { using type = lowp<K>; };
template <int K, class B> struct lowp_res<lowp<K>, B, std::enable_if_t<std::is_integral_v<B>>> { using type = lowp<K>; };
template <int K, class A> struct lowp_res<A, lowp<K>, std::enable_if_t<std::is_integral_v<A>>> { using type = lowp<K>; };
template <int K, class B> struct lowp_res<lowp<K>, B, std::enable_if_t<std::is_floating_point_v<B>>> { using type = B; };
template <int K, class A> struct lowp_res<A, lowp<K>, std::enable_if_t<std::is_floating_point_v<A>>> { using type = A; };
template <class A, class B> using lowp_res_t = typename lowp_res<std::remove_cv_t<A>, std::remove_cv_t<B>>::type;

template <class A> inline auto lp_val(A a) {
  if constexpr (is_lowp_v<A>) return (float)a; else return a;
}

#define MSL_LOWP_BINOP(OP)                                                        \
  template <class A, class B, class R = lowp_res_t<A, B>,                         \
            std::enable_if_t<!std::is_void_v<R>, int> = 0>                        \
  inline R operator OP(A a, B b) { return R(lp_val(a) OP lp_val(b)); }
MSL_LOWP_BINOP(+)
MSL_LOWP_BINOP(-)
MSL_LOWP_BINOP(*)
MSL_LOWP_BINOP(/)
#undef MSL_LOWP_BINOP
#define MSL_LOWP_CMP(OP)                                                          \
  template <class A, class B, class R = lowp_res_t<A, B>,                         \
            std::enable_if_t<!std::is_void_v<R>, int> = 0>                        \
  inline bool operator OP(A a, B b) { return lp_val(a) OP lp_val(b); }
MSL_LOWP_CMP(==)
MSL_LOWP_CMP(!=)
MSL_LOWP_CMP(<)
MSL_LOWP_CMP(<=)
MSL_LOWP_CMP(>)
MSL_LOWP_CMP(>=)
#undef MSL_LOWP_CMP
#define MSL_LOWP_CASSIGN(OP)                                                      \
  template <int K, class B, std::enable_if_t<std::is_arithmetic_v<B> || is_lowp_v<B>, int> = 0> \
  inline lowp<K>& operator OP##=(lowp<K>& a, B b) { a = lowp<K>(lp_val(a) OP lp_val(b)); return a; }
MSL_LOWP_CASSIGN(+)
MSL_LOWP_CASSIGN(-)
MSL_LOWP_CASSIGN(*)
MSL_LOWP_CASSIGN(/)
#undef MSL_LOWP_CASSIGN
template <int K> inline lowp<K> operator-(lowp<K> a) { return lowp<K>::from_bits(a.bits ^ 0x8000); }
template <int K> inline lowp<K> operator+(lowp<K> a) { return a; }

// ===========================================================================
// Vector types (float2/3/4, uint3, ...). Members x y z w and operator[].
// Swizzles (.xy, .xyz) are NOT supported.
// ===========================================================================
template <class T, int N> struct vec;
#define MSL_VEC_COMMON(N)                                                          \
  using value_type = T;                                                            \
  static constexpr int size = N;                                                   \
  T& operator[](int i) { return (&x)[i]; }                                         \
  const T& operator[](int i) const { return (&x)[i]; }                             \
  template <class U> explicit vec(const vec<U, N>& o) { for (int i = 0; i < N; ++i) (*this)[i] = T(o[i]); }
template <class T> struct alignas(2 * sizeof(T)) vec<T, 2> {
  T x, y;
  vec() = default;
  vec(T s) : x(s), y(s) {}
  vec(T a, T b) : x(a), y(b) {}
  MSL_VEC_COMMON(2)
};
template <class T> struct alignas(4 * sizeof(T)) vec<T, 3> {
  T x, y, z;
  vec() = default;
  vec(T s) : x(s), y(s), z(s) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  MSL_VEC_COMMON(3)
};
template <class T> struct alignas(4 * sizeof(T)) vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  vec(T s) : x(s), y(s), z(s), w(s) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  vec(vec<T, 2> a, vec<T, 2> b) : x(a.x), y(a.y), z(b.x), w(b.y) {}
  vec(vec<T, 3> a, T d) : x(a.x), y(a.y), z(a.z), w(d) {}
  MSL_VEC_COMMON(4)
};
#undef MSL_VEC_COMMON
#define MSL_VEC_BINOP(OP)                                                          \
  template <class T, int N> inline vec<T, N> operator OP(vec<T, N> a, vec<T, N> b) { \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = T(a[i] OP b[i]); return r; }    \
  template <class T, int N, class S, std::enable_if_t<std::is_arithmetic_v<S> || is_lowp_v<S>, int> = 0> \
  inline vec<T, N> operator OP(vec<T, N> a, S s) {                                 \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = T(a[i] OP T(s)); return r; }    \
  template <class T, int N, class S, std::enable_if_t<std::is_arithmetic_v<S> || is_lowp_v<S>, int> = 0> \
  inline vec<T, N> operator OP(S s, vec<T, N> a) {                                 \
    vec<T, N> r; for (int i = 0; i < N; ++i) r[i] = T(T(s) OP a[i]); return r; }    \
  template <class T, int N, class S> inline vec<T, N>& operator OP##=(vec<T, N>& a, S s) { \
    a = a OP s; return a; }
MSL_VEC_BINOP(+)
MSL_VEC_BINOP(-)
MSL_VEC_BINOP(*)
MSL_VEC_BINOP(/)
#undef MSL_VEC_BINOP
template <class T, int N> inline vec<T, N> operator-(vec<T, N> a) {
  for (int i = 0; i < N; ++i) a[i] = -a[i];
  return a;
}

template <class T> struct is_vec : std::false_type {};
template <class T, int N> struct is_vec<vec<T, N>> : std::true_type {};

// ===========================================================================
// Runtime: fibers, scheduler, diagnostics.
// ===========================================================================
using uint = uint32_t;
using uint2 = vec<uint32_t, 2>;
using uint3 = vec<uint32_t, 3>;

struct Attrs {
  uint dispatch_quadgroups_per_threadgroup;
  uint dispatch_simdgroups_per_threadgroup;
  uint3 dispatch_threads_per_threadgroup;
  uint3 grid_origin;
  uint3 grid_size;
  uint quadgroup_index_in_threadgroup;
  uint quadgroups_per_threadgroup;
  uint simdgroup_index_in_threadgroup;
  uint simdgroups_per_threadgroup;
  uint thread_execution_width;
  uint thread_index_in_quadgroup;
  uint thread_index_in_simdgroup;
  uint thread_index_in_threadgroup;
  uint3 thread_position_in_grid;
  uint3 thread_position_in_threadgroup;
  uint3 threadgroup_position_in_grid;
  uint3 threadgroups_per_grid;
  uint3 threads_per_grid;
  uint threads_per_simdgroup;
  uint3 threads_per_threadgroup;
};

enum class St : uint8_t { Ready, Barrier, Coll, Done };

struct Lane;
using CombineFn = void (*)(Lane** lanes, int width);

struct Site {
  const char* file = nullptr;
  unsigned line = 0, col = 0;
  bool operator==(const Site& o) const { return line == o.line && col == o.col && file == o.file; }
};

struct Lane {
  ucontext_t ctx;
  St st = St::Ready;
  uint32_t lin = 0;       // thread_index_in_threadgroup
  uint32_t gid = 0;       // global linear thread id (for diagnostics / tracking)
  Attrs a;
  // collective in flight
  int cgroup = 0;         // 0 = simdgroup, 1 = quadgroup
  CombineFn fn = nullptr;
  const char* cname = "";
  Site site;
  int32_t param = 0;
  alignas(16) unsigned char val[64];
  alignas(16) unsigned char res[64];
  bool res_err = false;
};

struct OutTrack {          // per-output element shadow state
  bool enabled = false;
  bool initialised = false; // init_value given -> reads before writes are fine
  std::vector<uint32_t> writer;  // gid+1, 0 = never written
  std::vector<uint32_t> epoch;   // device-fence epoch of the writer's group at write time
  std::vector<uint32_t> group;   // linear threadgroup id of the writer
};

struct Options {
  int policy = 0;            // 0 forward, 1 reverse, 2 random
  uint32_t seed = 0;
  int simd_width = 32;
  int max_errors = 20;
  int max_threads_per_tg = 1024;
  int max_tg_bytes = 32768;
  int strict_barrier_exit = 1;  // thread returned while others wait at a barrier -> error
  int stack_kb = 256;
  int track_tg = 1;
  int sgm_variant = 0;          // simdgroup_matrix element-to-lane mapping (0 = MLX steel's)
};

struct TgSlot {
  void* ptr = nullptr; size_t bytes = 0; bool live = false;
  std::vector<unsigned char> snap;           // contents when the running lane was resumed
                                             // (kept current incrementally, see run_group)
  std::vector<uint32_t> wlane, wepoch;       // per byte: last writer lane+1, tg-fence epoch
};

struct Sched {
  Options opt;
  ucontext_t main_ctx;
  std::vector<Lane> lanes;
  std::vector<int> queue;     // runnable lanes
  int cur = -1;
  int nthreads = 0;           // threads actually launched in this group
  char* stacks = nullptr;
  size_t stack_bytes = 0, stack_stride = 0, nstacks = 0;
  void (*kernel)(void*, const Attrs&) = nullptr;
  void* user = nullptr;
  // barrier state
  Site barrier_site;
  int barrier_flags = 0;
  int barrier_waiting = 0;
  uint32_t tg_epoch = 0, dev_epoch = 0, tgmem_epoch = 0;
  bool track_tg = true;
  uint32_t group_lin = 0;
  // threadgroup memory
  std::vector<TgSlot> tg;
  size_t tg_bytes = 0;
  // diagnostics
  std::vector<std::string> errors;
  bool aborted = false;
  std::mt19937 rng;
  std::vector<OutTrack> outs;
  uint64_t switches = 0;
  int sgm_perm[64];           // simdgroup_matrix slot permutation for this launch
};

inline Sched& S() { static Sched s; return s; }
inline Lane& cur_lane() { return S().lanes[S().cur]; }

inline std::string where(const Lane& l) {
  char b[200];
  std::snprintf(b, sizeof b, "thread_position_in_grid=(%u,%u,%u) threadgroup=(%u,%u,%u) lane %u",
                l.a.thread_position_in_grid.x, l.a.thread_position_in_grid.y,
                l.a.thread_position_in_grid.z, l.a.threadgroup_position_in_grid.x,
                l.a.threadgroup_position_in_grid.y, l.a.threadgroup_position_in_grid.z,
                l.a.thread_index_in_simdgroup);
  return b;
}

inline void error(const char* fmt, ...) {
  auto& s = S();
  if ((int)s.errors.size() >= s.opt.max_errors) { s.aborted = true; return; }
  char b[1024];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(b, sizeof b, fmt, ap);
  va_end(ap);
  std::string m(b);
  if (s.cur >= 0) m += " [" + where(cur_lane()) + "]";
  s.errors.push_back(m);
  if ((int)s.errors.size() >= s.opt.max_errors) s.aborted = true;
}

// give control back to the scheduler (called by a fiber)
inline void yield_to_sched() {
  auto& s = S();
  Lane& l = cur_lane();
  s.switches++;
  swapcontext(&l.ctx, &s.main_ctx);
}

// A fatal error inside a fiber: stop the whole launch.
[[noreturn]] inline void fatal_in_fiber() {
  S().aborted = true;
  for (;;) yield_to_sched();
}

// ---------------------------------------------------------------------------
// threadgroup memory
template <class T> inline T& tg_alloc(int slot) {
  auto& s = S();
  if ((int)s.tg.size() <= slot) s.tg.resize(slot + 1);
  TgSlot& t = s.tg[slot];
  if (!t.live) {
    if (t.bytes < sizeof(T)) {
      std::free(t.ptr);
      t.ptr = std::aligned_alloc(64, (sizeof(T) + 63) / 64 * 64);
      t.bytes = sizeof(T);
    }
    std::memset(t.ptr, 0xFF, sizeof(T));  // poison: NaN for floats, -1 for ints
    t.live = true;
    if (s.track_tg) {
      t.snap.assign(sizeof(T), 0xFF);
      t.wlane.assign(sizeof(T), 0);
      t.wepoch.assign(sizeof(T), 0);
    }
    s.tg_bytes += sizeof(T);
    if ((int)s.tg_bytes > s.opt.max_tg_bytes)
      error("threadgroup memory %zu bytes exceeds the %d byte limit", s.tg_bytes, s.opt.max_tg_bytes);
  }
  return *reinterpret_cast<T*>(t.ptr);
}

// ---------------------------------------------------------------------------
// collectives
inline int group_width(int cgroup) { return cgroup == 0 ? S().opt.simd_width : 4; }

inline void try_complete_group(int first_lin, int cgroup);

template <class T>
inline T collective(const char* name, int cgroup, T v, int32_t param, CombineFn fn, Site site) {
  static_assert(sizeof(T) <= 64, "collective value too large");
  auto& s = S();
  Lane& l = cur_lane();
  std::memcpy(l.val, &v, sizeof(T));
  l.param = param;
  l.fn = fn;
  l.cname = name;
  l.site = site;
  l.cgroup = cgroup;
  l.res_err = false;
  l.st = St::Coll;
  int w = group_width(cgroup);
  try_complete_group((int)(l.lin / w) * w, cgroup);
  if (l.st == St::Coll) yield_to_sched();
  if (s.aborted) fatal_in_fiber();
  T r;
  std::memcpy(&r, l.res, sizeof(T));
  return r;
}

inline void make_ready(int idx);

// all live lanes of the group at the same collective -> combine
inline void try_complete_group(int first_lin, int cgroup) {
  auto& s = S();
  int w = group_width(cgroup);
  Lane* g[128] = {nullptr};
  int nlive = 0, nwait = 0;
  Lane* ref = nullptr;
  for (int i = 0; i < w; ++i) {
    int idx = first_lin + i;
    if (idx >= s.nthreads) break;
    Lane& l = s.lanes[idx];
    if (l.st == St::Done) continue;
    nlive++;
    if (l.st == St::Coll && l.cgroup == cgroup) {
      nwait++;
      g[i] = &l;
      if (!ref) ref = &l;
    }
  }
  if (!ref || nwait != nlive) return;  // someone still running / elsewhere
  for (int i = 0; i < w; ++i) {
    if (!g[i]) continue;
    if (!(g[i]->site == ref->site) || g[i]->fn != ref->fn) {
      int save = s.cur;
      s.cur = (int)(g[i] - s.lanes.data());
      error("divergent %s collective: lane %d is at %s (body line %u col %u) while lane %d is at %s (line %u col %u); "
            "collectives must be reached by all live lanes of the %s",
            cgroup ? "quad" : "simd", i, g[i]->cname, g[i]->site.line, g[i]->site.col,
            (int)(ref->lin % w), ref->cname, ref->site.line, ref->site.col, cgroup ? "quadgroup" : "simdgroup");
      s.cur = save;
      s.aborted = true;
      return;
    }
  }
  ref->fn(g, w);
  bool rev = s.opt.policy == 1;
  for (int k = 0; k < w; ++k) {
    int i = rev ? w - 1 - k : k;
    if (g[i]) {
      if (g[i]->res_err) {
        int save = s.cur;
        s.cur = (int)(g[i] - s.lanes.data());
        error("%s reads an inactive or out-of-range lane (param %d)", g[i]->cname, g[i]->param);
        s.cur = save;
      }
      make_ready((int)(g[i] - s.lanes.data()));
    }
  }
}

template <class T> struct coll_ops {
  static T get(Lane* l) { T v; std::memcpy(&v, l->val, sizeof(T)); return v; }
  static void put(Lane* l, const T& v) { std::memcpy(l->res, &v, sizeof(T)); }
};

template <class T, class Op> void combine_reduce(Lane** g, int w) {
  // pairwise tree over the active lanes (lane order), like a butterfly
  T vals[128];
  int n = 0;
  for (int i = 0; i < w; ++i) if (g[i]) vals[n++] = coll_ops<T>::get(g[i]);
  for (int stride = 1; stride < n; stride *= 2)
    for (int i = 0; i + stride < n; i += 2 * stride) vals[i] = Op()(vals[i], vals[i + stride]);
  for (int i = 0; i < w; ++i) if (g[i]) coll_ops<T>::put(g[i], vals[0]);
}
template <class T, class Op, bool Inclusive> void combine_prefix(Lane** g, int w) {
  bool first = true;
  T acc{};
  for (int i = 0; i < w; ++i) {
    if (!g[i]) continue;
    T v = coll_ops<T>::get(g[i]);
    if (Inclusive) { acc = first ? v : Op()(acc, v); coll_ops<T>::put(g[i], acc); }
    else { coll_ops<T>::put(g[i], first ? T(0) : acc); acc = first ? v : Op()(acc, v); }
    first = false;
  }
}
// mode: 0 shuffle(idx) 1 down 2 up 3 xor 4 rotate_down 5 rotate_up 6 broadcast 7 broadcast_first
template <class T, int Mode> void combine_shuffle(Lane** g, int w) {
  int firsta = -1;
  for (int i = 0; i < w; ++i) if (g[i]) { firsta = i; break; }
  for (int i = 0; i < w; ++i) {
    if (!g[i]) continue;
    int p = g[i]->param, src = i;
    bool keep_own = false;
    switch (Mode) {
      case 0: case 6: src = p; break;
      case 1: src = i + p; if (src >= w) keep_own = true; break;
      case 2: src = i - p; if (src < 0) keep_own = true; break;
      case 3: src = i ^ p; break;
      case 4: src = (i + p) % w; break;
      case 5: src = ((i - p) % w + w) % w; break;
      case 7: src = firsta; break;
    }
    if (keep_own) { coll_ops<T>::put(g[i], coll_ops<T>::get(g[i])); continue; }
    if (src < 0 || src >= w || !g[src]) { g[i]->res_err = true; coll_ops<T>::put(g[i], T{}); continue; }
    if (Mode == 6 && g[src]->param != p) g[i]->res_err = true;  // non-uniform broadcast lane
    coll_ops<T>::put(g[i], coll_ops<T>::get(g[src]));
  }
}
inline void combine_vote(Lane** g, int w) {   // val = bool; res = uint64 ballot mask
  uint64_t m = 0, active = 0;
  for (int i = 0; i < w; ++i) if (g[i]) { active |= 1ull << i; bool b; std::memcpy(&b, g[i]->val, 1); if (b) m |= 1ull << i; }
  for (int i = 0; i < w; ++i) if (g[i]) { std::memcpy(g[i]->res, &m, 8); std::memcpy(g[i]->res + 8, &active, 8); }
}
inline void combine_noop(Lane** g, int w) { (void)g; (void)w; }

struct OpAdd { template <class T> T operator()(T a, T b) const { return T(a + b); } };
struct OpMul { template <class T> T operator()(T a, T b) const { return T(a * b); } };
struct OpMin { template <class T> T operator()(T a, T b) const { return b < a ? b : a; } };
struct OpMax { template <class T> T operator()(T a, T b) const { return a < b ? b : a; } };
struct OpAnd { template <class T> T operator()(T a, T b) const { return T(a & b); } };
struct OpOr  { template <class T> T operator()(T a, T b) const { return T(a | b); } };
struct OpXor { template <class T> T operator()(T a, T b) const { return T(a ^ b); } };

inline Site mksite(const std::source_location& l) { return Site{l.file_name(), l.line(), l.column()}; }

// ---------------------------------------------------------------------------
// threadgroup barrier
inline void make_ready(int idx) {
  auto& s = S();
  s.lanes[idx].st = St::Ready;
  s.queue.push_back(idx);
}

// Attribute the threadgroup-memory bytes the running lane changed since the
// last scan to it, at the current barrier epoch, and flag a byte written by
// another lane in the same epoch (no threadgroup_barrier in between). Runs when
// a lane yields, and before a lane's arrival can release a barrier (so writes
// made before the barrier are never counted after it).
inline void scan_tg_writes() {
  auto& s = S();
  if (!s.track_tg || s.cur < 0) return;
  const int me = s.cur;
  for (size_t k = 0; k < s.tg.size(); ++k) {
    auto& t = s.tg[k];
    if (!t.live) continue;
    const unsigned char* now = (const unsigned char*)t.ptr;
    if (std::memcmp(now, t.snap.data(), t.snap.size()) == 0) continue;
    bool reported = false;
    for (size_t b = 0; b < t.snap.size(); ++b) {
      if (now[b] == t.snap[b]) continue;
      if (!reported && t.wlane[b] != 0 && t.wlane[b] != (uint32_t)me + 1 &&
          t.wepoch[b] == s.tgmem_epoch) {
        error("race: threadgroup memory (slot %zu, byte %zu) written by this thread and by thread %u "
              "of the threadgroup with no threadgroup_barrier(mem_flags::mem_threadgroup) in between",
              k, b, t.wlane[b] - 1);
        reported = true;  // one report per slot and scan; keep the snapshot current
      }
      t.wlane[b] = (uint32_t)me + 1;
      t.wepoch[b] = s.tgmem_epoch;
      t.snap[b] = now[b];
    }
  }
}

inline void try_release_barrier() {
  auto& s = S();
  if (s.barrier_waiting == 0) return;
  int live = 0;
  for (int i = 0; i < s.nthreads; ++i) if (s.lanes[i].st != St::Done) live++;
  if (s.barrier_waiting != live) return;
  for (int i = 0; i < s.nthreads; ++i) if (s.lanes[i].st == St::Barrier && !(s.lanes[i].site == s.barrier_site)) {
    s.cur = i;
    error("threads wait at different threadgroup_barrier calls (line %u vs line %u)",
          s.lanes[i].site.line, s.barrier_site.line);
    s.aborted = true;
    return;
  }
  s.barrier_waiting = 0;
  s.tg_epoch++;
  if (s.barrier_flags & 1) s.dev_epoch++;   // mem_flags::mem_device orders device memory
  if (s.barrier_flags & 2) s.tgmem_epoch++; // mem_flags::mem_threadgroup orders threadgroup memory
  // order of release follows the schedule policy
  bool rev = s.opt.policy == 1;
  for (int k = 0; k < s.nthreads; ++k) {
    int i = rev ? s.nthreads - 1 - k : k;
    if (s.lanes[i].st == St::Barrier) make_ready(i);
  }
}

} // namespace msl

// ===========================================================================
// The `metal` namespace the kernel body sees (MLX's preamble does
// `using namespace metal;`).
// ===========================================================================
namespace metal {
using ::msl::vec;
using half = ::msl::half_t;
using bfloat = ::msl::bfloat_t;
using uint = uint32_t;
using ushort = uint16_t;
using uchar = uint8_t;
using ulong = uint64_t;
using float2 = vec<float, 2>; using float3 = vec<float, 3>; using float4 = vec<float, 4>;
using half2 = vec<half, 2>; using half3 = vec<half, 3>; using half4 = vec<half, 4>;
using bfloat2 = vec<bfloat, 2>; using bfloat4 = vec<bfloat, 4>;
using int2 = vec<int, 2>; using int3 = vec<int, 3>; using int4 = vec<int, 4>;
using uint2 = vec<uint, 2>; using uint3 = vec<uint, 3>; using uint4 = vec<uint, 4>;
using short2 = vec<short, 2>; using short4 = vec<short, 4>;
using ushort2 = vec<ushort, 2>; using ushort3 = vec<ushort, 3>; using ushort4 = vec<ushort, 4>;
using uchar4 = vec<uchar, 4>; using char4 = vec<signed char, 4>;
using long2 = vec<int64_t, 2>; using ulong2 = vec<uint64_t, 2>;
using bool2 = vec<bool, 2>; using bool3 = vec<bool, 3>; using bool4 = vec<bool, 4>;

enum class mem_flags : int { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4,
                             mem_threadgroup_imageblock = 8, mem_object_data = 16 };
inline constexpr mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

template <class T> struct numeric_limits : std::numeric_limits<T> {};
template <> struct numeric_limits<half> {
  static half max() { return half::from_bits(0x7bff); }
  static half min() { return half::from_bits(0x0400); }
  static half lowest() { return half::from_bits(0xfbff); }
  static half infinity() { return half::from_bits(0x7c00); }
  static half quiet_NaN() { return half::from_bits(0x7e00); }
  static half epsilon() { return half::from_bits(0x1400); }
};
template <> struct numeric_limits<bfloat> {
  static bfloat max() { return bfloat::from_bits(0x7f7f); }
  static bfloat min() { return bfloat::from_bits(0x0080); }
  static bfloat lowest() { return bfloat::from_bits(0xff7f); }
  static bfloat infinity() { return bfloat::from_bits(0x7f80); }
  static bfloat quiet_NaN() { return bfloat::from_bits(0x7fc0); }
  static bfloat epsilon() { return bfloat::from_bits(0x3c00); }
};

// ---- math: templates (so they win over ::exp(double) for float args and lose
// to nothing else). Scalars: float, half, bfloat; vectors element-wise.
template <class T> inline constexpr bool is_fp_v = std::is_floating_point_v<T> || ::msl::is_lowp_v<T>;

#define MSL_UNARY(NAME, EXPR)                                                       \
  template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T NAME(T v) {    \
    float x = (float)v; return T(EXPR); }                                            \
  template <class T, int N> inline vec<T, N> NAME(vec<T, N> v) {                     \
    for (int i = 0; i < N; ++i) v[i] = NAME(v[i]); return v; }
#define MSL_MATH_SET                                                                 \
  MSL_UNARY(exp, std::exp(x)) MSL_UNARY(exp2, std::exp2(x)) MSL_UNARY(exp10, std::pow(10.0f, x)) \
  MSL_UNARY(log, std::log(x)) MSL_UNARY(log2, std::log2(x)) MSL_UNARY(log10, std::log10(x)) \
  MSL_UNARY(sqrt, std::sqrt(x)) MSL_UNARY(rsqrt, 1.0f / std::sqrt(x))                 \
  MSL_UNARY(sin, std::sin(x)) MSL_UNARY(cos, std::cos(x)) MSL_UNARY(tan, std::tan(x)) \
  MSL_UNARY(tanh, std::tanh(x)) MSL_UNARY(sinh, std::sinh(x)) MSL_UNARY(cosh, std::cosh(x)) \
  MSL_UNARY(asin, std::asin(x)) MSL_UNARY(acos, std::acos(x)) MSL_UNARY(atan, std::atan(x)) \
  MSL_UNARY(floor, std::floor(x)) MSL_UNARY(ceil, std::ceil(x)) MSL_UNARY(round, std::round(x)) \
  MSL_UNARY(rint, std::rint(x)) MSL_UNARY(trunc, std::trunc(x)) MSL_UNARY(fabs, std::fabs(x)) \
  MSL_UNARY(erf, std::erf(x)) MSL_UNARY(saturate, std::min(std::max(x, 0.0f), 1.0f)) \
  MSL_UNARY(fract, x - std::floor(x)) MSL_UNARY(sign, (x > 0) - (x < 0))
MSL_MATH_SET
namespace fast { MSL_MATH_SET }      // same maths: fast:: variants are NOT bit-exact on GPU
namespace precise { MSL_MATH_SET }
#undef MSL_MATH_SET
#undef MSL_UNARY

template <class T, std::enable_if_t<std::is_arithmetic_v<T> || ::msl::is_lowp_v<T>, int> = 0>
inline T abs(T v) { return v < T(0) ? T(-v) : v; }
#define MSL_MINMAX(T) inline T max(T a, T b) { return a < b ? b : a; } \
                      inline T min(T a, T b) { return b < a ? b : a; }
MSL_MINMAX(float) MSL_MINMAX(half) MSL_MINMAX(bfloat) MSL_MINMAX(int) MSL_MINMAX(uint32_t)
MSL_MINMAX(int64_t) MSL_MINMAX(uint64_t) MSL_MINMAX(short) MSL_MINMAX(uint16_t)
MSL_MINMAX(signed char) MSL_MINMAX(uint8_t)
#undef MSL_MINMAX
template <class T, int N> inline vec<T, N> max(vec<T, N> a, vec<T, N> b) { for (int i = 0; i < N; ++i) a[i] = max(a[i], b[i]); return a; }
template <class T, int N> inline vec<T, N> min(vec<T, N> a, vec<T, N> b) { for (int i = 0; i < N; ++i) a[i] = min(a[i], b[i]); return a; }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T fmax(T a, T b) { return T(std::fmax((float)a, (float)b)); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T fmin(T a, T b) { return T(std::fmin((float)a, (float)b)); }
template <class T> inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T fma(T a, T b, T c) { return T(std::fma((float)a, (float)b, (float)c)); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T pow(T a, T b) { return T(std::pow((float)a, (float)b)); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T powr(T a, T b) { return T(std::pow((float)a, (float)b)); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T atan2(T a, T b) { return T(std::atan2((float)a, (float)b)); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T copysign(T a, T b) { return T(std::copysign((float)a, (float)b)); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline T mix(T a, T b, T t) { return T((float)a + ((float)b - (float)a) * (float)t); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline bool isnan(T a) { return std::isnan((float)a); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline bool isinf(T a) { return std::isinf((float)a); }
template <class T, std::enable_if_t<is_fp_v<T>, int> = 0> inline bool isfinite(T a) { return std::isfinite((float)a); }
template <class T> inline T select(T a, T b, bool c) { return c ? b : a; }
template <class To, class From> inline To as_type(const From& f) {
  static_assert(sizeof(To) == sizeof(From), "as_type: size mismatch");
  To t; std::memcpy(&t, &f, sizeof(To)); return t; }
template <class T, int N> inline T dot(vec<T, N> a, vec<T, N> b) { T s = T(0); for (int i = 0; i < N; ++i) s = T(s + a[i] * b[i]); return s; }
template <class T> inline T divide(T a, T b) { return a / b; }
namespace fast { using metal::max; using metal::min; using metal::divide; }
namespace precise { using metal::max; using metal::min; using metal::fma; using metal::divide; }

template <class T, class U> inline T ceildiv(T a, U b) { return (a + b - 1) / b; }

// ---- barriers
inline void threadgroup_barrier(mem_flags f,
                                std::source_location loc = std::source_location::current()) {
  auto& s = ::msl::S();
  auto& l = ::msl::cur_lane();
  ::msl::scan_tg_writes();  // before this arrival can release the barrier
  l.st = ::msl::St::Barrier;
  l.site = ::msl::mksite(loc);
  if (s.barrier_waiting == 0) { s.barrier_site = l.site; s.barrier_flags = int(f); }
  s.barrier_waiting++;
  ::msl::try_release_barrier();
  if (l.st == ::msl::St::Barrier) ::msl::yield_to_sched();
  if (s.aborted) ::msl::fatal_in_fiber();
}
inline void simdgroup_barrier(mem_flags f,
                              std::source_location loc = std::source_location::current()) {
  (void)f;
  ::msl::collective<int>("simdgroup_barrier", 0, 0, 0, ::msl::combine_noop, ::msl::mksite(loc));
}

// ---- simd / quad collectives
#define MSL_COLL_RED(NAME, OP, G)                                                            \
  template <class T> inline T NAME(T v, std::source_location loc = std::source_location::current()) { \
    return ::msl::collective<T>(#NAME, G, v, 0, ::msl::combine_reduce<T, ::msl::OP>, ::msl::mksite(loc)); }
#define MSL_COLL_PREFIX(NAME, OP, INCL, G)                                                   \
  template <class T> inline T NAME(T v, std::source_location loc = std::source_location::current()) { \
    return ::msl::collective<T>(#NAME, G, v, 0, ::msl::combine_prefix<T, ::msl::OP, INCL>, ::msl::mksite(loc)); }
#define MSL_COLL_SHUF(NAME, MODE, G)                                                         \
  template <class T, class I> inline T NAME(T v, I p, std::source_location loc = std::source_location::current()) { \
    return ::msl::collective<T>(#NAME, G, v, (int32_t)p, ::msl::combine_shuffle<T, MODE>, ::msl::mksite(loc)); }
#define MSL_COLL_ALL(P, G)                                                                   \
  MSL_COLL_RED(P##_sum, OpAdd, G) MSL_COLL_RED(P##_product, OpMul, G)                         \
  MSL_COLL_RED(P##_min, OpMin, G) MSL_COLL_RED(P##_max, OpMax, G)                             \
  MSL_COLL_RED(P##_and, OpAnd, G) MSL_COLL_RED(P##_or, OpOr, G) MSL_COLL_RED(P##_xor, OpXor, G) \
  MSL_COLL_PREFIX(P##_prefix_inclusive_sum, OpAdd, true, G)                                   \
  MSL_COLL_PREFIX(P##_prefix_exclusive_sum, OpAdd, false, G)                                  \
  MSL_COLL_PREFIX(P##_prefix_inclusive_product, OpMul, true, G)                               \
  MSL_COLL_PREFIX(P##_prefix_exclusive_product, OpMul, false, G)                              \
  MSL_COLL_SHUF(P##_shuffle, 0, G) MSL_COLL_SHUF(P##_shuffle_down, 1, G)                      \
  MSL_COLL_SHUF(P##_shuffle_up, 2, G) MSL_COLL_SHUF(P##_shuffle_xor, 3, G)                    \
  MSL_COLL_SHUF(P##_shuffle_rotate_down, 4, G) MSL_COLL_SHUF(P##_shuffle_rotate_up, 5, G)     \
  MSL_COLL_SHUF(P##_broadcast, 6, G)                                                         \
  template <class T> inline T P##_broadcast_first(T v, std::source_location loc = std::source_location::current()) { \
    return ::msl::collective<T>(#P "_broadcast_first", G, v, 0, ::msl::combine_shuffle<T, 7>, ::msl::mksite(loc)); } \
  inline bool P##_all(bool b, std::source_location loc = std::source_location::current()) {  \
    struct R { uint64_t m, a; }; R r = ::msl::collective<R>(#P "_all", G, R{b, 0}, 0, ::msl::combine_vote, ::msl::mksite(loc)); \
    return r.m == r.a; }                                                                     \
  inline bool P##_any(bool b, std::source_location loc = std::source_location::current()) {  \
    struct R { uint64_t m, a; }; R r = ::msl::collective<R>(#P "_any", G, R{b, 0}, 0, ::msl::combine_vote, ::msl::mksite(loc)); \
    return r.m != 0; }                                                                       \
  inline uint64_t P##_ballot_mask(bool b, std::source_location loc = std::source_location::current()) { \
    struct R { uint64_t m, a; }; R r = ::msl::collective<R>(#P "_ballot", G, R{b, 0}, 0, ::msl::combine_vote, ::msl::mksite(loc)); \
    return r.m; }                                                                            \
  inline bool P##_is_first(std::source_location loc = std::source_location::current()) {     \
    uint32_t me = ::msl::cur_lane().lin % ::msl::group_width(G);                              \
    return P##_broadcast_first(me, loc) == me; }
MSL_COLL_ALL(simd, 0)
MSL_COLL_ALL(quad, 1)
#undef MSL_COLL_ALL
#undef MSL_COLL_RED
#undef MSL_COLL_PREFIX
#undef MSL_COLL_SHUF
struct simd_vote { using vote_t = uint64_t; vote_t v; explicit operator vote_t() const { return v; }
  bool any() const { return v != 0; } };
inline simd_vote simd_ballot(bool b, std::source_location loc = std::source_location::current()) {
  return simd_vote{simd_ballot_mask(b, loc)}; }

// ---- simdgroup_matrix (Apple7+; every M-series GPU).
// An 8x8 tile lives spread over the 32 lanes of a simdgroup, two elements per
// lane. Loads and stores are per-lane memory accesses, so a load that races a
// write (no barrier in between) shows up as a schedule-dependent result like
// any other; multiply(-accumulate) is a simdgroup collective that needs all 32
// lanes, converged at the same call. Which lane holds which element is
// unspecified in Metal: variant 0 is the layout MLX's steel GEMM assumes
// (row = 4*l4 + 2*l2 + l1, col = 4*l3 + 2*l0 + element, l_i = bit i of the
// lane), other schedules permute it, so a kernel relying on it (positional use
// of thread_elements()) gives schedule-dependent results.
// Arithmetic: products summed in k order in float, rounded once to the
// accumulator type (the GPU's order and, for half/bfloat, its internal
// precision are not documented: compare with a tolerance).
} // namespace metal
namespace msl {
template <class T> struct dptr;
template <class P> struct sgm_elem;
template <class T> struct sgm_elem<T*> { using type = std::remove_cv_t<T>; };
template <class T> struct sgm_elem<dptr<T>> { using type = std::remove_cv_t<T>; };

// (row, col) of this launch's element slot (lane * 2 + element)
inline void sgm_coord(int slot, int& r, int& c) {
  const int v = S().sgm_perm[slot];
  const int l = v >> 1, e = v & 1;
  r = 4 * ((l >> 4) & 1) + 2 * ((l >> 2) & 1) + ((l >> 1) & 1);
  c = 4 * ((l >> 3) & 1) + 2 * (l & 1) + e;
}
inline int sgm_lane() {
  if (S().opt.simd_width != 32) {
    error("simdgroup_matrix needs a SIMD width of 32 (emulating %d)", S().opt.simd_width);
    fatal_in_fiber();
  }
  return (int)(cur_lane().lin % 32);
}
struct MMAVal { float a[2], b[2], c[2]; };
inline void combine_mma(Lane** g, int w) {
  float A[8][8], B[8][8], C[8][8];
  int present = 0;
  for (int i = 0; i < w; ++i) {
    if (!g[i]) continue;
    present++;
    MMAVal v;
    std::memcpy(&v, g[i]->val, sizeof v);
    for (int e = 0; e < 2; ++e) {
      int r, c;
      sgm_coord(i * 2 + e, r, c);
      A[r][c] = v.a[e]; B[r][c] = v.b[e]; C[r][c] = v.c[e];
    }
  }
  if (present != 32) {
    int save = S().cur;
    for (int i = 0; i < w; ++i) if (g[i]) { S().cur = (int)(g[i] - S().lanes.data()); break; }
    error("%s with %d of 32 lanes of the simdgroup active: simdgroup_matrix operations need "
          "the whole simdgroup (no early return, no partial threadgroup)", g[0] ? g[0]->cname :
          "simdgroup_multiply_accumulate", present);
    S().cur = save;
    for (int i = 0; i < w; ++i) if (g[i]) { MMAVal r{}; r.c[0] = r.c[1] = NAN; std::memcpy(g[i]->res, &r, sizeof r); }
    return;
  }
  float D[8][8];
  for (int r = 0; r < 8; ++r)
    for (int c = 0; c < 8; ++c) {
      float acc = C[r][c];
      for (int k = 0; k < 8; ++k) acc += A[r][k] * B[k][c];
      D[r][c] = acc;
    }
  for (int i = 0; i < w; ++i) {
    MMAVal v{};
    for (int e = 0; e < 2; ++e) {
      int r, c;
      sgm_coord(i * 2 + e, r, c);
      v.c[e] = D[r][c];
    }
    std::memcpy(g[i]->res, &v, sizeof v);
  }
}
} // namespace msl
namespace metal {
template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "Metal has 8x8 simdgroup matrices only");
  vec<T, 2> e;   // this lane's two elements
  simdgroup_matrix() : e(T(NAN)) {}   // uninitialised: NaN, so a use shows
  explicit simdgroup_matrix(T d) {    // Metal: a diagonal matrix
    const int lane = ::msl::sgm_lane();
    for (int i = 0; i < 2; ++i) {
      int r, c;
      ::msl::sgm_coord(lane * 2 + i, r, c);
      e[i] = r == c ? d : T(0);
    }
  }
  vec<T, 2>& thread_elements() { return e; }
  const vec<T, 2>& thread_elements() const { return e; }
};
using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
using simdgroup_half8x8 = simdgroup_matrix<half, 8, 8>;
using simdgroup_bfloat8x8 = simdgroup_matrix<bfloat, 8, 8>;

template <class T, int Cols, int Rows = Cols>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(T v) {
  simdgroup_matrix<T, Cols, Rows> m;
  m.e = vec<T, 2>(v);
  return m;
}
// Element (r, c) of the tile is src[(origin.y + r) * elements_per_row + origin.x + c],
// or src[(origin.y + c) * elements_per_row + origin.x + r] when transposed.
inline int64_t sgm_offset(int r, int c, uint64_t epr, vec<uint64_t, 2> o, bool tr) {
  return tr ? (int64_t)((o.y + c) * epr + o.x + r) : (int64_t)((o.y + r) * epr + o.x + c);
}
template <class T, int C, int R, class P>
inline void simdgroup_load(simdgroup_matrix<T, C, R>& d, P src, uint64_t elements_per_row = C,
                           vec<uint64_t, 2> matrix_origin = vec<uint64_t, 2>(0),
                           bool transpose_matrix = false) {
  static_assert(std::is_same_v<typename ::msl::sgm_elem<P>::type, T>,
                "simdgroup_load: the memory's element type must be the matrix's");
  const int lane = ::msl::sgm_lane();
  for (int i = 0; i < 2; ++i) {
    int r, c;
    ::msl::sgm_coord(lane * 2 + i, r, c);
    d.e[i] = T(src[sgm_offset(r, c, elements_per_row, matrix_origin, transpose_matrix)]);
  }
}
template <class T, int C, int R, class P>
inline void simdgroup_store(const simdgroup_matrix<T, C, R>& a, P dst, uint64_t elements_per_row = C,
                            vec<uint64_t, 2> matrix_origin = vec<uint64_t, 2>(0),
                            bool transpose_matrix = false) {
  static_assert(std::is_same_v<typename ::msl::sgm_elem<P>::type, T>,
                "simdgroup_store: the memory's element type must be the matrix's");
  const int lane = ::msl::sgm_lane();
  for (int i = 0; i < 2; ++i) {
    int r, c;
    ::msl::sgm_coord(lane * 2 + i, r, c);
    dst[sgm_offset(r, c, elements_per_row, matrix_origin, transpose_matrix)] = a.e[i];
  }
}
template <class T, class U, class V, class W>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<U, 8, 8>& a,
                                          const simdgroup_matrix<V, 8, 8>& b,
                                          const simdgroup_matrix<W, 8, 8>& c,
                                          std::source_location loc = std::source_location::current()) {
  ::msl::sgm_lane();
  ::msl::MMAVal v;
  for (int i = 0; i < 2; ++i) { v.a[i] = float(a.e[i]); v.b[i] = float(b.e[i]); v.c[i] = float(c.e[i]); }
  ::msl::MMAVal r = ::msl::collective<::msl::MMAVal>("simdgroup_multiply_accumulate", 0, v, 0,
                                                     ::msl::combine_mma, ::msl::mksite(loc));
  for (int i = 0; i < 2; ++i) d.e[i] = T(r.c[i]);
}
template <class T, class U, class V>
inline void simdgroup_multiply(simdgroup_matrix<T, 8, 8>& d, const simdgroup_matrix<U, 8, 8>& a,
                               const simdgroup_matrix<V, 8, 8>& b,
                               std::source_location loc = std::source_location::current()) {
  ::msl::sgm_lane();
  ::msl::MMAVal v;
  for (int i = 0; i < 2; ++i) { v.a[i] = float(a.e[i]); v.b[i] = float(b.e[i]); v.c[i] = 0.0f; }
  ::msl::MMAVal r = ::msl::collective<::msl::MMAVal>("simdgroup_multiply", 0, v, 0,
                                                     ::msl::combine_mma, ::msl::mksite(loc));
  for (int i = 0; i < 2; ++i) d.e[i] = T(r.c[i]);
}

// ---- atomics (cooperative single-OS-thread scheduling => trivially atomic)
enum memory_order { memory_order_relaxed, memory_order_seq_cst };
template <class T> struct atomic { T v; };
using atomic_int = atomic<int>;
using atomic_uint = atomic<uint>;
using atomic_float = atomic<float>;
using atomic_bool = atomic<bool>;
template <class T, class U> inline void atomic_store_explicit(atomic<T>* a, U v, memory_order) { a->v = T(v); }
template <class T> inline T atomic_load_explicit(const atomic<T>* a, memory_order) { return a->v; }
template <class T, class U> inline T atomic_exchange_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(v); return o; }
template <class T, class U> inline T atomic_fetch_add_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(o + v); return o; }
template <class T, class U> inline T atomic_fetch_sub_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(o - v); return o; }
template <class T, class U> inline T atomic_fetch_max_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = max(o, T(v)); return o; }
template <class T, class U> inline T atomic_fetch_min_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = min(o, T(v)); return o; }
template <class T, class U> inline T atomic_fetch_and_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(o & v); return o; }
template <class T, class U> inline T atomic_fetch_or_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(o | v); return o; }
template <class T, class U> inline T atomic_fetch_xor_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = T(o ^ v); return o; }
template <class T, class U> inline bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U desired, memory_order, memory_order) {
  if (a->v == *expected) { a->v = T(desired); return true; } *expected = a->v; return false; }
template <class T> struct is_atomic : std::false_type {};
template <class T> struct is_atomic<atomic<T>> : std::true_type {};
} // namespace metal

// ---------------------------------------------------------------------------
// MLX preamble names (mlx/backend/metal/kernels/utils.h subset)
using namespace metal;
typedef metal::half float16_t;
typedef metal::bfloat bfloat16_t;
using metal::half;
using metal::bfloat;

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(metal::uint3 elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}
template <typename IdxT = int64_t> inline IdxT elem_to_loc_1(uint elem, const int64_t& stride) { return elem * IdxT(stride); }
template <typename IdxT = int64_t> inline IdxT elem_to_loc_2(metal::uint2 elem, const int64_t strides[2]) {
  return elem.x * IdxT(strides[1]) + elem.y * IdxT(strides[0]); }
template <typename IdxT = int64_t> inline IdxT elem_to_loc_3(metal::uint3 elem, const int64_t strides[3]) {
  return elem.x * IdxT(strides[2]) + elem.y * IdxT(strides[1]) + elem.z * IdxT(strides[0]); }

namespace msl {

// ===========================================================================
// Checked device pointers (kernel buffer parameters)
// ===========================================================================
struct BufInfo { const char* name; int64_t lo, hi; int track; };

template <class T> struct dref;   // tracked element reference (outputs)

template <class T>
struct dptr {
  T* p = nullptr;
  T* base = nullptr;
  const BufInfo* info = nullptr;
  dptr() = default;
  dptr(T* p_, T* base_, const BufInfo* i) : p(p_), base(base_), info(i) {}
  static constexpr bool tracked = !std::is_const_v<T> && !metal::is_atomic<std::remove_cv_t<T>>::value;
  using ref_t = std::conditional_t<tracked, dref<T>, T&>;

  T* check(int64_t i) const {
    int64_t off = (p - base) + i;
    if (off < info->lo || off > info->hi) {
      error("out-of-bounds access %s[%lld] (valid element range %lld..%lld)", info->name,
            (long long)off, (long long)info->lo, (long long)info->hi);
      static thread_local std::aligned_storage_t<sizeof(T) < 64 ? 64 : sizeof(T), 16> scratch;
      std::memset(&scratch, 0, sizeof scratch);
      return reinterpret_cast<T*>(&scratch);
    }
    return p + i;
  }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  ref_t operator[](I i) const {
    T* q = check((int64_t)i);
    if constexpr (tracked) {
      int64_t off = (p - base) + (int64_t)i;
      bool oob = off < info->lo || off > info->hi;
      return dref<T>(q, oob ? INT64_MIN : off, info);   // OOB -> scratch, untracked
    } else {
      return *q;
    }
  }
  ref_t operator*() const { return (*this)[0]; }
  T* operator->() const { return check(0); }
  operator T*() const { return p; }
  template <class U, std::enable_if_t<std::is_convertible_v<T*, U*> && !std::is_same_v<T, U>, int> = 0>
  operator dptr<U>() const { return dptr<U>(p, base, info); }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  dptr operator+(I i) const { return dptr(p + i, base, info); }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  dptr operator-(I i) const { return dptr(p - i, base, info); }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  dptr& operator+=(I i) { p += i; return *this; }
  template <class I, std::enable_if_t<std::is_integral_v<I>, int> = 0>
  dptr& operator-=(I i) { p -= i; return *this; }
  dptr& operator++() { ++p; return *this; }
  dptr operator++(int) { dptr o = *this; ++p; return o; }
  dptr& operator--() { --p; return *this; }
  ptrdiff_t operator-(const dptr& o) const { return p - o.p; }
};
template <class I, class T, std::enable_if_t<std::is_integral_v<I>, int> = 0>
inline dptr<T> operator+(I i, const dptr<T>& d) { return d + i; }

inline void track_access(const BufInfo* info, int64_t off, bool is_write) {
  auto& s = S();
  if (info->track < 0 || off == INT64_MIN) return;
  OutTrack& t = s.outs[info->track];
  if (!t.enabled) return;
  Lane& me = cur_lane();
  uint32_t w = t.writer[off];
  if (w != 0 && w != me.gid + 1) {
    if (t.group[off] != s.group_lin) {
      error("race: %s[%lld] %s by this thread but written by thread gid %u of another threadgroup "
            "in the same dispatch", info->name, (long long)off, is_write ? "written" : "read", w - 1);
    } else if (t.epoch[off] == s.dev_epoch) {
      error("race: %s[%lld] %s by this thread and written by thread gid %u of the same threadgroup "
            "with no threadgroup_barrier(mem_flags::mem_device) in between",
            info->name, (long long)off, is_write ? "written" : "read", w - 1);
    }
  } else if (w == 0 && !is_write && !t.initialised) {
    error("read of output %s[%lld] before any thread wrote it (outputs are uninitialised "
          "unless init_value is given)", info->name, (long long)off);
  }
  if (is_write) {
    t.writer[off] = me.gid + 1;
    t.epoch[off] = s.dev_epoch;
    t.group[off] = s.group_lin;
  }
}

template <class T>
struct dref {
  T* q; int64_t off; const BufInfo* info;
  dref(T* q_, int64_t o, const BufInfo* i) : q(q_), off(o), info(i) {}
  operator T() const { track_access(info, off, false); return *q; }
  template <class U> dref& operator=(U&& v) { track_access(info, off, true); *q = T(std::forward<U>(v)); return *this; }
  dref& operator=(const dref& o) { T v = (T)o; track_access(info, off, true); *q = v; return *this; }
  T* operator&() const { return q; }
  T* operator->() const { return q; }
  template <class I> decltype(auto) operator[](I i) const { track_access(info, off, false); return (*q)[i]; }
#define MSL_DREF_CA(OP) template <class U> dref& operator OP##=(U&& v) { \
    T cur = (T)*this; track_access(info, off, true); *q = T(cur OP std::forward<U>(v)); return *this; }
  MSL_DREF_CA(+) MSL_DREF_CA(-) MSL_DREF_CA(*) MSL_DREF_CA(/) MSL_DREF_CA(|) MSL_DREF_CA(&) MSL_DREF_CA(^)
#undef MSL_DREF_CA
  dref& operator++() { *this += 1; return *this; }
  T operator++(int) { T o = (T)*this; *this += 1; return o; }
};

// ===========================================================================
// Grid execution
// ===========================================================================
inline void fiber_entry() {
  auto& s = S();
  Lane& l = s.lanes[s.cur];
  s.kernel(s.user, l.a);
  l.st = St::Done;
  // returning resumes main_ctx through uc_link
}

inline void ensure_stacks(size_t n) {
  auto& s = S();
  size_t page = (size_t)sysconf(_SC_PAGESIZE);
  size_t want = (size_t)s.opt.stack_kb * 1024;
  if (n <= s.nstacks && want == s.stack_bytes) return;
  if (s.stacks) munmap(s.stacks, s.stack_stride * s.nstacks);
  s.stack_bytes = want;
  s.stack_stride = want + page;  // + guard page
  s.nstacks = n;
  s.stacks = (char*)mmap(nullptr, s.stack_stride * n, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  for (size_t i = 0; i < n; ++i) mprotect(s.stacks + i * s.stack_stride, page, PROT_NONE);
}

inline void diagnose_deadlock() {
  auto& s = S();
  int at_bar = 0, at_coll = 0, done = 0;
  for (int i = 0; i < s.nthreads; ++i) {
    if (s.lanes[i].st == St::Barrier) at_bar++;
    else if (s.lanes[i].st == St::Coll) at_coll++;
    else if (s.lanes[i].st == St::Done) done++;
  }
  char b[400];
  std::snprintf(b, sizeof b,
                "deadlock in threadgroup (%u,%u,%u): %d threads at threadgroup_barrier, %d at a "
                "simd/quad collective, %d returned -- barrier or collective reached by only part "
                "of the group (divergent control flow)",
                s.lanes[0].a.threadgroup_position_in_grid.x, s.lanes[0].a.threadgroup_position_in_grid.y,
                s.lanes[0].a.threadgroup_position_in_grid.z, at_bar, at_coll, done);
  int save = s.cur; s.cur = -1; error("%s", b); s.cur = save;
  s.aborted = true;
}

inline int run_group(uint3 gpos, const int grid[3], const int tgd[3], const int ngroups[3]) {
  auto& s = S();
  uint32_t ax = std::min<int>(tgd[0], grid[0] - (int)gpos.x * tgd[0]);
  uint32_t ay = std::min<int>(tgd[1], grid[1] - (int)gpos.y * tgd[1]);
  uint32_t az = std::min<int>(tgd[2], grid[2] - (int)gpos.z * tgd[2]);
  int n = (int)(ax * ay * az);
  s.nthreads = n;
  s.group_lin = gpos.x + ngroups[0] * (gpos.y + ngroups[1] * gpos.z);
  s.barrier_waiting = 0;
  s.tg_epoch = 0;
  s.tgmem_epoch = 0;
  for (auto& t : s.tg) t.live = false;
  s.tg_bytes = 0;
  int W = s.opt.simd_width;
  uint32_t disp_threads = (uint32_t)(tgd[0] * tgd[1] * tgd[2]);
  for (int i = 0; i < n; ++i) {
    Lane& l = s.lanes[i];
    l.st = St::Ready;
    l.lin = i;
    uint32_t lx = i % ax, ly = (i / ax) % ay, lz = i / (ax * ay);
    Attrs& a = l.a;
    a.thread_position_in_threadgroup = uint3(lx, ly, lz);
    a.threadgroup_position_in_grid = gpos;
    a.thread_position_in_grid = uint3(gpos.x * tgd[0] + lx, gpos.y * tgd[1] + ly, gpos.z * tgd[2] + lz);
    a.threads_per_threadgroup = uint3(ax, ay, az);
    a.dispatch_threads_per_threadgroup = uint3(tgd[0], tgd[1], tgd[2]);
    a.threadgroups_per_grid = uint3(ngroups[0], ngroups[1], ngroups[2]);
    a.threads_per_grid = uint3(grid[0], grid[1], grid[2]);
    a.grid_size = a.threads_per_grid;
    a.grid_origin = uint3(0, 0, 0);
    a.thread_index_in_threadgroup = i;
    a.simdgroup_index_in_threadgroup = i / W;
    a.thread_index_in_simdgroup = i % W;
    a.threads_per_simdgroup = W;
    a.thread_execution_width = W;
    a.simdgroups_per_threadgroup = (n + W - 1) / W;
    a.dispatch_simdgroups_per_threadgroup = (disp_threads + W - 1) / W;
    a.quadgroup_index_in_threadgroup = i / 4;
    a.thread_index_in_quadgroup = i % 4;
    a.quadgroups_per_threadgroup = (n + 3) / 4;
    a.dispatch_quadgroups_per_threadgroup = (disp_threads + 3) / 4;
    const auto& tp = a.thread_position_in_grid;
    l.gid = tp.x + grid[0] * (tp.y + grid[1] * tp.z);
    getcontext(&l.ctx);
    l.ctx.uc_stack.ss_sp = s.stacks + i * s.stack_stride + (s.stack_stride - s.stack_bytes);
    l.ctx.uc_stack.ss_size = s.stack_bytes;
    l.ctx.uc_link = &s.main_ctx;
    makecontext(&l.ctx, (void (*)())fiber_entry, 0);
  }
  s.queue.clear();
  for (int i = 0; i < n; ++i) s.queue.push_back(s.opt.policy == 1 ? n - 1 - i : i);
  size_t head = 0;
  while (!s.aborted) {
    if (head >= s.queue.size()) {
      bool all_done = true;
      for (int i = 0; i < n; ++i) if (s.lanes[i].st != St::Done) { all_done = false; break; }
      if (all_done) break;
      diagnose_deadlock();
      break;
    }
    int pick;
    if (s.opt.policy == 2) {
      size_t j = head + s.rng() % (s.queue.size() - head);
      std::swap(s.queue[head], s.queue[j]);
    }
    pick = s.queue[head++];
    if (head > 4096 && head * 2 > s.queue.size()) { s.queue.erase(s.queue.begin(), s.queue.begin() + head); head = 0; }
    Lane& l = s.lanes[pick];
    if (l.st != St::Ready) continue;
    s.cur = pick;
    s.switches++;
    // Only fibers write threadgroup memory, so the snapshot taken after the
    // previous fiber's run is still current: no copy before resuming.
    swapcontext(&s.main_ctx, &l.ctx);
    s.cur = pick;
    scan_tg_writes();
    if (s.aborted) break;
    if (l.st == St::Done) {
      // a returning lane may complete a pending collective of its group
      try_complete_group((int)(l.lin / W) * W, 0);
      try_complete_group((int)(l.lin / 4) * 4, 1);
      if (s.barrier_waiting > 0) {
        if (s.opt.strict_barrier_exit) {
          error("thread returned while %d other thread(s) wait at threadgroup_barrier (line %u): "
                "every thread of the threadgroup must reach the barrier", s.barrier_waiting,
                s.barrier_site.line);
          s.aborted = true;
          break;
        }
        try_release_barrier();
      }
    }
  }
  s.cur = -1;
  return s.aborted ? 1 : 0;
}

inline int run_grid(void (*kernel)(void*, const Attrs&), void* user, const int grid[3],
                    const int tg_req[3], const Options& opt) {
  auto& s = S();
  s.opt = opt;
  s.errors.clear();
  s.aborted = false;
  s.kernel = kernel;
  s.user = user;
  s.rng.seed(opt.seed);
  s.dev_epoch = 0;
  s.switches = 0;
  s.track_tg = opt.track_tg != 0;
  // simdgroup_matrix: which lane holds which element is unspecified in Metal;
  // a kernel must not depend on it. Variant 0 is the layout MLX's steel GEMM
  // assumes, others are fixed pseudo-random permutations of it.
  for (int i = 0; i < 64; ++i) s.sgm_perm[i] = i;
  if (opt.sgm_variant) {
    std::mt19937 g((uint32_t)opt.sgm_variant * 2654435761u);
    for (int i = 63; i > 0; --i) std::swap(s.sgm_perm[i], s.sgm_perm[g() % (uint32_t)(i + 1)]);
  }
  int tgd[3], ng[3];
  for (int d = 0; d < 3; ++d) {
    if (grid[d] <= 0 || tg_req[d] <= 0) { error("grid and threadgroup sizes must be positive"); return 1; }
    tgd[d] = std::min(tg_req[d], grid[d]);    // as MLX: MTL::Size(min(tx,gx), ...)
    ng[d] = (grid[d] + tgd[d] - 1) / tgd[d];
  }
  int per_tg = tgd[0] * tgd[1] * tgd[2];
  if (per_tg > opt.max_threads_per_tg) {
    error("threadgroup size %d exceeds the maximum of %d threads per threadgroup", per_tg, opt.max_threads_per_tg);
    return 1;
  }
  if (s.lanes.size() < (size_t)per_tg) s.lanes.resize(per_tg);
  ensure_stacks(per_tg);
  for (int z = 0; z < ng[2] && !s.aborted; ++z)
    for (int y = 0; y < ng[1] && !s.aborted; ++y)
      for (int x = 0; x < ng[0] && !s.aborted; ++x)
        run_group(uint3(x, y, z), grid, tgd, ng);
  return (int)s.errors.size() + (s.aborted ? 1 : 0);
}

} // namespace msl
