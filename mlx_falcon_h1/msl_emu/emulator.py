"""Run an `mx.fast.metal_kernel` body on a CPU: translate, compile with g++, run on fibers.

The Metal source is generated exactly as MLX does (codegen.py), parsed back
into its signature and body, and compiled as C++20 against msl_emu.h into a
shared library (cached by content hash). Each launch runs every threadgroup's
threads as fibers on one OS thread, once per schedule policy; results must not
depend on the schedule. See msl_emu.h for what is checked.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import re
import signal
import subprocess
import tempfile
import time

import numpy as np

from .codegen import MSL_TO_NP, generate_metal_source, type_string

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "msl_emu.h")
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = os.environ.get("MSL_EMU_CXXFLAGS", "-O1 -g0").split()

# Emulator options a call can override (mx.fast.metal_kernel has none of these names).
DEFAULTS = dict(
    schedules=("forward", "reverse", "random:1"),
    simd_width=32,
    track_races=True,  # True: every schedule; "first": only the first (faster)
    strict_barrier_exit=True,
    max_errors=20,
    stack_kb=256,
    isolate=False,  # run in a forked child: survives wild pointers / sanitizer aborts
    compare_schedules=True,
    schedule_atol=0.0,
    # How an ensure_row_contiguous=False kernel receives its array inputs: "given"
    # (numpy arrays with their own strides; mx arrays row-contiguous), "contiguous",
    # or "padded" (every axis padded, innermost stride 2, the gaps NaN) to check
    # that the kernel really indexes through its `_strides`.
    layout="given",
)

POLICIES = {"forward": 0, "reverse": 1, "random": 2}


class MSLEmuError(RuntimeError):
    """A kernel that does not compile, or that broke a rule while running."""

    def __init__(self, msg, errors=()):
        super().__init__(msg + ("\n  " + "\n  ".join(errors) if errors else ""))
        self.errors = list(errors)


def cache_dir() -> str:
    """Where compiled kernels are kept: $MSL_EMU_CACHE, else the user's cache folder."""
    explicit = os.environ.get("MSL_EMU_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mlx_falcon_h1", "msl_emu")


# ---------------------------------------------------------------------------
# Metal source -> C++ translation unit
# ---------------------------------------------------------------------------
_PARAM_RE = re.compile(
    r"^\s*(?P<const>const\s+)?(?P<space>device|constant)\s+(?P<type>[\w:<>]+)(?P<ref>[*&])\s+"
    r"(?P<name>\w+)\s+\[\[buffer\((?P<idx>\d+)\)\]\]"
)
_ATTR_RE = re.compile(r"^\s*(?P<type>uint3?|ushort3?)\s+(?P<name>\w+)\s+\[\[(?P<attr>\w+)\]\]")
_TG_DECL_RE = re.compile(
    r"(?<![\w.])threadgroup\s+(?P<type>(?:const\s+)?[A-Za-z_][\w:]*(?:\s*<[^;{}()]*?>)?)\s+"
    r"(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]+\]\s*)*);"
)
_METAL_INCLUDE_RE = re.compile(r"^[ \t]*#[ \t]*include[ \t]*<metal_\w+>[ \t]*$", re.M)


def parse_metal_source(full: str, header: str):
    """Split a generated Metal source into (template declaration, kernel name, params, body)."""
    if not full.startswith(header):
        raise MSLEmuError("generated source does not start with the header")
    rest = full[len(header):]
    m = re.match(r"(template <[^\n]*>\n)?\[\[kernel\]\] void (\w+)\(\n", rest)
    if not m:
        raise MSLEmuError("cannot parse the generated kernel signature")
    tdecl, kname = (m.group(1) or "").strip(), m.group(2)
    rest = rest[m.end():]
    end = rest.index(") {\n")
    sig, body = rest[:end], rest[end + 4:]
    body = body[: body.rfind("\n}\n")]  # the body ends before the explicit instantiation
    params = []
    for line in sig.split(",\n"):
        if not line.strip():
            continue
        pm = _PARAM_RE.match(line)
        if pm:
            params.append(dict(kind="buf", const=bool(pm["const"]), space=pm["space"],
                               type=pm["type"], ref=pm["ref"], name=pm["name"], idx=int(pm["idx"])))
            continue
        am = _ATTR_RE.match(line)
        if am:
            params.append(dict(kind="attr", type=am["type"], name=am["name"]))
            continue
        raise MSLEmuError(f"cannot parse signature line: {line!r}")
    return tdecl, kname, params, body


def rewrite_threadgroup_decls(body: str) -> str:
    """`threadgroup T name[dims];` -> a reference to memory shared by the group's fibers."""
    slots = []

    def sub(m):
        slots.append(m["name"])
        t = m["type"] + (" " + m["dims"].strip() if m["dims"].strip() else "")
        return f"auto& {m['name']} = ::msl::tg_alloc<{t}>({len(slots) - 1});"

    return _TG_DECL_RE.sub(sub, body)


def _cpp_template_value(a) -> str:
    if isinstance(a, (bool, np.bool_)):
        return "true" if a else "false"
    if isinstance(a, (int, np.integer)):
        return str(int(a))
    return type_string(a)


def build_cpp(header, tdecl, kname, params, body, template_args, input_names):
    # Metal's own headers (<metal_simdgroup_matrix>, ...) are what msl_emu.h emulates.
    header = _METAL_INCLUDE_RE.sub("// (Metal header, emulated by msl_emu.h)", header)
    body = rewrite_threadgroup_decls(body)
    sig, call, infos = [], [], []  # infos: per buffer (name, output index or -1)
    out_i = 0
    for p in params:
        if p["kind"] == "attr":
            sig.append(f"{p['type']} {p['name']}")
            call.append(f"a.{p['name']}")
            continue
        i, t, n = p["idx"], p["type"], p["name"]
        if n.endswith("_shape") and t == "int":
            sig.append(f"const int* {n}")
            call.append(f"(const int*)P[{i}]")
            infos.append((n, -1))
        elif n.endswith("_strides") and t == "int64_t":
            sig.append(f"const int64_t* {n}")
            call.append(f"(const int64_t*)P[{i}]")
            infos.append((n, -1))
        elif n.endswith("_ndim") and p["ref"] == "&" and t == "int" and n not in input_names:
            sig.append(f"const int& {n}")
            call.append(f"*(const int*)P[{i}]")
            infos.append((n, -1))
        elif p["ref"] == "&":  # scalar input
            sig.append(f"const {t}& {n}")
            call.append(f"*(const {t}*)P[{i}]")
            infos.append((n, -1))
        elif p["const"]:  # input array
            sig.append(f"::msl::dptr<const {t}> {n}")
            call.append(f"::msl::dptr<const {t}>((const {t}*)P[{i}], (const {t}*)P[{i}], &I[{i}])")
            infos.append((n, -1))
        else:  # output
            sig.append(f"::msl::dptr<{t}> {n}")
            call.append(f"::msl::dptr<{t}>(({t}*)P[{i}], ({t}*)P[{i}], &I[{i}])")
            infos.append((n, out_i))
            out_i += 1
    targs = ""
    if template_args:
        targs = "<" + ", ".join(_cpp_template_value(a) for _, a in template_args) + ">"
    nb = max(len(infos), 1)
    names = ", ".join(json.dumps(n) for n, _ in infos)
    tracks = ", ".join(str(t) for _, t in infos)
    sep, sep2 = ",\n  ", ",\n    "
    return f"""// generated by msl_emu -- do not edit
#include "msl_emu.h"
#line 1 "header"
{header}
#line 1 "signature"
{tdecl}
void {kname}(
  {sep.join(sig)}) {{
#line 1 "body"
{body}
}}
#line 1 "launcher"
static void* P[{nb}];
static ::msl::BufInfo I[{nb}];
static const char* NAMES[{nb}] = {{{names}}};
static const int TRACK[{nb}] = {{{tracks}}};
static void invoke(void*, const ::msl::Attrs& a) {{
  (void)a;
  {kname}{targs}(
    {sep2.join(call)});
}}
extern "C" int msl_launch(void** ptrs, const long long* lo, const long long* hi,
                          const int* grid, const int* tg, const int* opt,
                          const long long* out_sizes, int init_flag) {{
  auto& s = ::msl::S();
  int nout = 0;
  for (int i = 0; i < {len(infos)}; ++i) {{
    P[i] = ptrs[i];
    I[i] = ::msl::BufInfo{{NAMES[i], lo[i], hi[i], opt[6] ? TRACK[i] : -1}};
    if (TRACK[i] >= 0) nout++;
  }}
  s.outs.assign(nout, ::msl::OutTrack{{}});
  for (int k = 0; k < nout && opt[6]; ++k) {{
    auto& t = s.outs[k];
    t.enabled = true;
    t.initialised = init_flag != 0;
    t.writer.assign(out_sizes[k], 0);
    t.epoch.assign(out_sizes[k], 0);
    t.group.assign(out_sizes[k], 0);
  }}
  ::msl::Options o;
  o.policy = opt[0]; o.seed = (uint32_t)opt[1]; o.simd_width = opt[2];
  o.max_errors = opt[3]; o.strict_barrier_exit = opt[4]; o.stack_kb = opt[5];
  o.track_tg = opt[6]; o.sgm_variant = opt[7];
  return ::msl::run_grid(invoke, nullptr, grid, tg, o);
}}
extern "C" int msl_error_count() {{ return (int)::msl::S().errors.size(); }}
extern "C" const char* msl_error(int i) {{ return ::msl::S().errors[i].c_str(); }}
extern "C" unsigned long long msl_switches() {{ return ::msl::S().switches; }}
"""


_LIBS: dict[str, ctypes.CDLL] = {}
STATS = {"compile_s": 0.0, "compiles": 0, "cache_hits": 0}


def compile_cpp(cpp: str) -> str:
    """Compile a translation unit into a shared library, or reuse the cached one."""
    cache = cache_dir()
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError:  # read-only home: a temporary folder still caches within the run
        cache = os.path.join(tempfile.gettempdir(), "mlx_falcon_h1_msl_emu")
        os.makedirs(cache, exist_ok=True)
    with open(HEADER, "rb") as f:
        hdr = f.read()
    key = hashlib.sha256(cpp.encode() + hdr + " ".join([CXX] + CXXFLAGS).encode()).hexdigest()[:24]
    so = os.path.join(cache, f"k_{key}.so")
    if os.path.exists(so):
        STATS["cache_hits"] += 1
        return so
    # Per-process names, renamed into place: concurrent runs never see half a file.
    src = os.path.join(cache, f"k_{key}.{os.getpid()}.cpp")
    with open(src, "w") as f:
        f.write(cpp)
    t0 = time.perf_counter()
    tmp = f"{so}.{os.getpid()}.tmp"
    cmd = [CXX, "-std=c++20", *CXXFLAGS, "-fPIC", "-shared", "-Wno-attributes", "-I", HERE, src,
           "-o", tmp]
    r = subprocess.run(cmd, capture_output=True, text=True)
    STATS["compile_s"] += time.perf_counter() - t0
    STATS["compiles"] += 1
    if r.returncode != 0:
        raise MSLEmuError(f"C++ compilation of the kernel failed ({src}):\n{r.stderr[-6000:]}")
    os.replace(src, src.replace(f".{os.getpid()}.cpp", ".cpp"))  # kept for debugging
    os.replace(tmp, so)
    return so


def _load(so: str) -> ctypes.CDLL:
    lib = _LIBS.get(so)
    if lib is None:
        lib = ctypes.CDLL(so)
        lib.msl_launch.restype = ctypes.c_int
        lib.msl_error.restype = ctypes.c_char_p
        lib.msl_switches.restype = ctypes.c_ulonglong
        _LIBS[so] = lib
    return lib


def _parse_schedule(s: str):
    """'forward' | 'reverse' | 'random:SEED' -> (policy, seed, simdgroup_matrix layout variant)."""
    policy, _, seed = s.partition(":")
    if policy not in POLICIES:
        raise ValueError(f"schedule {s!r}: expected forward, reverse or random:SEED")
    seed = int(seed or 0)
    return POLICIES[policy], seed, {"forward": 0, "reverse": 1}.get(policy, 2 + seed)


# ---------------------------------------------------------------------------
# Host arrays
# ---------------------------------------------------------------------------
class _Host:
    """An input as the kernel sees it: a numpy view of its memory and its Metal type."""

    def __init__(self, data: np.ndarray, tstr: str, scalar: bool = False):
        self.data, self.tstr, self.scalar = data, tstr, scalar

    @property
    def ndim(self):
        return 0 if self.scalar else self.data.ndim

    @property
    def size(self):
        return 1 if self.scalar else self.data.size


def _is_mx(x) -> bool:
    return type(x).__module__.startswith("mlx")


def _host(x) -> _Host:
    if isinstance(x, (bool, np.bool_)):
        return _Host(np.asarray(x, dtype=np.bool_), "bool", scalar=True)
    if isinstance(x, (int, np.integer)):
        return _Host(np.asarray(x, dtype=np.int32), "int32_t", scalar=True)  # as MLX
    if isinstance(x, float):
        return _Host(np.asarray(x, dtype=np.float32), "float", scalar=True)  # as MLX
    if _is_mx(x):
        import mlx.core as mx

        tstr = type_string(x.dtype)
        data = np.array(x.view(mx.uint16) if x.dtype == mx.bfloat16 else x)
        return _Host(data, tstr, scalar=x.ndim == 0)
    a = np.asarray(x)
    if a.dtype == np.float64:
        raise TypeError("float64 input: Metal has no double; cast first")
    tstr = type_string(a.dtype)
    if tstr == "bfloat16_t":
        a = a.view(np.uint16)
    return _Host(a, tstr, scalar=a.ndim == 0)


def _padded_view(a: np.ndarray) -> np.ndarray:
    """The same values in a bigger NaN/0xFF-filled buffer: every axis padded, innermost stride 2."""
    if a.ndim == 0 or a.size == 0:
        return a
    shape = [d + 1 for d in a.shape[:-1]] + [2 * a.shape[-1] + 1]
    buf = np.empty(shape, dtype=a.dtype)
    buf.view(np.uint8).reshape(-1)[:] = 0xFF
    view = buf[tuple(slice(0, d) for d in a.shape[:-1]) + (slice(0, 2 * a.shape[-1], 2),)]
    view[...] = a
    return view


def _to_output(arr: np.ndarray, tstr: str, as_mx: bool):
    if not as_mx:
        if tstr == "bfloat16_t":
            try:
                import ml_dtypes

                return arr.view(ml_dtypes.bfloat16)
            except ImportError:
                return arr  # the raw bits
        return arr
    import mlx.core as mx

    if tstr == "bfloat16_t":
        return mx.array(arr).view(mx.bfloat16)
    return mx.array(arr)


# ---------------------------------------------------------------------------
# The stand-in for mx.fast.metal_kernel
# ---------------------------------------------------------------------------
class metal_kernel:
    """Drop-in for `mx.fast.metal_kernel` that runs on the CPU under checks.

    Called exactly like MLX's kernel object; takes mx arrays (returns mx arrays)
    or numpy arrays (returns numpy arrays). Emulator options (DEFAULTS) can be
    given to the constructor or to a call.
    """

    def __init__(self, name, input_names, output_names, source, header="",
                 ensure_row_contiguous=True, atomic_outputs=False, compile_options=None,
                 **options):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown emulator options {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
        self.name = name
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.source, self.header = source, header
        self.ensure_row_contiguous, self.atomic_outputs = ensure_row_contiguous, atomic_outputs
        self.options = {**DEFAULTS, **options}
        self.last = {}

    def metal_source(self, inputs, output_dtypes, template=None) -> str:
        """The Metal source MLX would generate for these inputs (no compilation)."""
        hosts = [_host(x) for x in inputs]
        return generate_metal_source(
            self.name, self.input_names, self.output_names, self.source, self.header,
            self.atomic_outputs, [(h.tstr, h.ndim, h.size) for h in hosts], output_dtypes,
            list(template or []),
        )[1]

    def __call__(self, *, inputs, output_shapes, output_dtypes, grid, threadgroup, template=None,
                 init_value=None, verbose=False, stream=None, **overrides):
        opts = {**self.options, **overrides}
        unknown = set(overrides) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown emulator options {sorted(unknown)}; valid: {sorted(DEFAULTS)}")
        if len(inputs) != len(self.input_names):
            raise ValueError(f"[metal_kernel] Expected `inputs` to have size "
                             f"{len(self.input_names)} but got size {len(inputs)}.")
        as_mx = any(_is_mx(x) for x in inputs)
        template = list(template or [])
        hosts = [_host(x) for x in inputs]
        for h in hosts:
            if h.scalar:
                h.data = np.ascontiguousarray(h.data).reshape(1)
            elif self.ensure_row_contiguous or opts["layout"] == "contiguous":
                h.data = np.ascontiguousarray(h.data)
            elif opts["layout"] == "padded":
                h.data = _padded_view(h.data)
            elif opts["layout"] != "given":
                raise ValueError(f"layout {opts['layout']!r}: expected given, contiguous or padded")
        out_tstrs = [type_string(d) for d in output_dtypes]
        kname, msrc = generate_metal_source(
            self.name, self.input_names, self.output_names, self.source, self.header,
            self.atomic_outputs, [(h.tstr, h.ndim, h.size) for h in hosts], output_dtypes, template)
        tdecl, kname2, params, body = parse_metal_source(msrc, self.header)
        cpp = build_cpp(self.header, tdecl, kname2, params, body, template, self.input_names)
        t0 = time.perf_counter()
        so = compile_cpp(cpp)
        t_compile = time.perf_counter() - t0
        lib = _load(so)
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{msrc}\n```\nC++: {so[:-3]}.cpp")

        by_name = dict(zip(self.input_names, hosts))
        results, run_times = None, []
        schedules = tuple(opts["schedules"])
        for k, sched in enumerate(schedules):
            policy, seed, variant = _parse_schedule(sched)
            track = bool(opts["track_races"]) and (opts["track_races"] != "first" or k == 0)
            outs = []
            for shape, tstr in zip(output_shapes, out_tstrs):
                dt = MSL_TO_NP[tstr]
                count = int(np.prod(shape, dtype=np.int64))
                if opts["isolate"]:  # shared with the forked child
                    o = np.frombuffer(mmap.mmap(-1, max(count * dt.itemsize, 1)), dtype=dt,
                                      count=count).reshape(shape)
                else:
                    o = np.empty(shape, dtype=dt)
                if init_value is not None:
                    o[...] = init_value
                else:
                    o.view(np.uint8).reshape(-1)[:] = 0xFF  # poison: NaN / -1
                outs.append(o)
            keep, ptrs, lo, hi, out_sizes = [], [], [], [], []

            def add(arr, lo_, hi_):
                keep.append(arr)
                ptrs.append(arr.ctypes.data)
                lo.append(lo_)
                hi.append(hi_)

            out_iter = iter(outs)
            for p in params:
                if p["kind"] == "attr":
                    continue
                n = p["name"]
                if n in by_name and p["const"]:
                    h = by_name[n]
                    if h.scalar:
                        add(h.data, 0, 0)
                        continue
                    a = h.data
                    if any(s % a.itemsize for s in a.strides):
                        raise MSLEmuError(f"input {n}: strides not a multiple of the item size")
                    st = [s // a.itemsize for s in a.strides]
                    lo_ = sum(min(0, (d - 1) * s) for d, s in zip(a.shape, st))
                    hi_ = sum(max(0, (d - 1) * s) for d, s in zip(a.shape, st))
                    add(a, *((0, -1) if a.size == 0 else (lo_, hi_)))
                elif n.endswith("_shape") and n[:-6] in by_name:
                    add(np.asarray(by_name[n[:-6]].data.shape, dtype=np.int32), 0, 0)
                elif n.endswith("_strides") and n[:-8] in by_name:
                    a = by_name[n[:-8]].data
                    add(np.asarray([s // a.itemsize for s in a.strides], dtype=np.int64), 0, 0)
                elif n.endswith("_ndim") and n[:-5] in by_name:
                    add(np.asarray([by_name[n[:-5]].data.ndim], dtype=np.int32), 0, 0)
                else:
                    o = next(out_iter)
                    add(o, 0, o.size - 1)
                    out_sizes.append(o.size)
            nb = max(len(ptrs), 1)
            args = (
                (ctypes.c_void_p * nb)(*ptrs),
                (ctypes.c_longlong * nb)(*lo),
                (ctypes.c_longlong * nb)(*hi),
                (ctypes.c_int * 3)(*grid),
                (ctypes.c_int * 3)(*threadgroup),
                (ctypes.c_int * 8)(policy, seed, opts["simd_width"], opts["max_errors"],
                                   int(opts["strict_barrier_exit"]), opts["stack_kb"], int(track),
                                   variant),
                (ctypes.c_longlong * max(len(out_sizes), 1))(*out_sizes),
                int(init_value is not None),
            )
            t1 = time.perf_counter()
            if opts["isolate"]:
                errs = _run_isolated(lib, args)
            else:
                lib.msl_launch(*args)
                errs = [lib.msl_error(i).decode() for i in range(lib.msl_error_count())]
            run_times.append(time.perf_counter() - t1)
            if errs:
                raise MSLEmuError(f"[{self.name}] kernel errors under schedule '{sched}'", errs)
            outs = [np.array(o) for o in outs]
            if results is None:
                results = outs
            elif opts["compare_schedules"]:
                for name, r0, r1 in zip(self.output_names, results, outs):
                    _check_same(self.name, name, r0, r1, schedules[0], sched, opts["schedule_atol"])
        self.last = dict(compile_s=t_compile, run_s=run_times, so=so,
                         switches=None if opts["isolate"] else lib.msl_switches())
        return [_to_output(r, t, as_mx) for r, t in zip(results, out_tstrs)]


def _check_same(kernel, output, r0, r1, s0, s1, atol):
    if atol == 0:
        if np.array_equal(r0.view(np.uint8), r1.view(np.uint8)):
            return
        bad = np.flatnonzero((r0 != r1) & ~(np.isnan(r0.astype(np.float64)) &
                                            np.isnan(r1.astype(np.float64))))
        if bad.size == 0:  # only NaN payloads differ
            return
    else:
        a, b = r0.astype(np.float64), r1.astype(np.float64)
        ok = np.isclose(a, b, atol=atol, rtol=0, equal_nan=True)
        if ok.all():
            return
        bad = np.flatnonzero(~ok)
    raise MSLEmuError(
        f"[{kernel}] output '{output}' depends on thread scheduling ('{s0}' vs '{s1}'): "
        f"{bad.size} elements differ, first flat indices {bad[:5].tolist()} -- a missing "
        "barrier, a race, or reliance on the simdgroup_matrix element layout")


def _run_isolated(lib, args):
    """Run a launch in a forked child so a wild pointer or an abort is reported, not fatal."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        import faulthandler

        faulthandler.disable()  # the crash is the expected report, not a traceback
        try:
            lib.msl_launch(*args)
            errs = [lib.msl_error(i).decode() for i in range(lib.msl_error_count())]
            os.write(w, json.dumps(errs).encode())
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = signal.Signals(os.WTERMSIG(status)).name
        return [f"kernel crashed: {sig} (wild pointer / stack overflow?)"]
    if os.WEXITSTATUS(status) != 0 or not data:
        return [f"kernel process exited with status {os.WEXITSTATUS(status)} "
                "(sanitizer abort? see stderr)"]
    return json.loads(data.decode())
