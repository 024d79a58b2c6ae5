"""quantized_decode_attention's two Metal passes against its reference, in the emulator.

The reference itself is checked against the definition: mx.dequantize of the
bulk, the tail appended, the real keys' softmax, in float64 numpy.
"""

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")
from mlx_lm.models.base import quantized_scaled_dot_product_attention  # noqa: E402

from mlx_falcon_h1 import msl_emu  # noqa: E402
from mlx_falcon_h1.kernels import metal_available  # noqa: E402
from mlx_falcon_h1.kernels import quantized_attention as mod  # noqa: E402
from mlx_falcon_h1.kernels import runtime_check  # noqa: E402
from mlx_falcon_h1.msl_emu import MSLEmuError  # noqa: E402
from mlx_falcon_h1.msl_emu.testing import emulated, refuse_kernel  # noqa: E402

pytestmark = pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")

F32, F16, BF16 = mx.float32, mx.float16, mx.bfloat16
FAST = dict(schedules=("forward",))


def make_inputs(seed, dtype, heads=4, kv_heads=2, head_dim=64, bits=4, group_size=64, batch=1,
                bulk_capacity=256, bulk_len=100, tail_capacity=40, tail_len=5):
    sizes = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, bits=bits,
                 group_size=group_size, dtype=dtype, bulk_capacity=bulk_capacity,
                 bulk_len=bulk_len, tail_capacity=tail_capacity, tail_len=tail_len)
    return runtime_check.check_inputs(mod.KERNEL_OP, sizes, batch=batch, seed=seed)


def as_projected(q, kv_heads):
    """q (B, Hq, 1, D) as the model has it: the query heads of a transposed
    (B, 1, Hq + Hkv, D) projection (queries and keys), a view with gaps."""
    b, h, length, d = q.shape
    qk = mx.concatenate([q.transpose(0, 2, 1, 3), mx.zeros((b, length, kv_heads, d), q.dtype)],
                        axis=2)
    return mx.contiguous(qk).transpose(0, 2, 1, 3)[:, :h]


def emulated_call(inp, **options):
    """The dispatcher with both passes emulated; asserts it took them."""
    with emulated(mod, **{**FAST, **options}):
        out = mod.quantized_decode_attention(**inp)
        mx.eval(out)
        assert mod._KERNEL.last and mod._KERNEL_COMBINE.last, "the dispatcher did not take the kernel"
    return out


def check(inp, **options):
    out = emulated_call(inp, **options)
    ref = mod.quantized_decode_attention_reference(**inp)
    assert out.dtype == ref.dtype == inp["q"].dtype and out.shape == ref.shape
    rel = runtime_check.relative_error([out], [ref])
    assert rel <= mod.KERNEL_OP.tolerance[inp["q"].dtype], rel
    return out


# name: (dtype, make_inputs keywords, emulator options)
CASES = {
    # 7B's grouping (R = 6) at D 128, bfloat16 as the checkpoints ship
    "bf16_b4_g64_R6": (BF16, dict(heads=12, kv_heads=2, head_dim=128, bulk_capacity=512,
                                  bulk_len=300, tail_capacity=256, tail_len=37), {}),
    "bf16_b8_g128": (BF16, dict(bits=8, group_size=128, head_dim=128, bulk_len=201), {}),
    "f16_b4_g32_batch2": (F16, dict(group_size=32, batch=2, bulk_len=77, tail_len=40), {}),
    "f32_b8_g32_padded": (F32, dict(bits=8, group_size=32, heads=6, kv_heads=3),
                          dict(layout="padded")),
    "f32_b2_g64": (F32, dict(bits=2, bulk_len=129), {}),
    "f16_b8_g64_D96_R1": (F16, dict(bits=8, heads=2, kv_heads=2, head_dim=96, group_size=32),
                          {}),
    "f32_D32_every_schedule": (F32, dict(heads=2, kv_heads=1, head_dim=32, group_size=32,
                                         bulk_capacity=70, bulk_len=67, tail_len=3),
                               dict(schedules=("forward", "reverse", "random:1"))),
    # edge cases: an empty tail, an empty bulk, a bulk of capacity 0, both full,
    # a length one past a block (64 keys), one key in all
    "empty_tail": (BF16, dict(tail_len=0), {}),
    "empty_bulk": (F32, dict(bulk_len=0, tail_len=40), {}),
    "no_bulk_capacity": (F16, dict(bulk_capacity=0, bulk_len=0, tail_len=9), {}),
    "no_tail_capacity": (F32, dict(tail_capacity=0, tail_len=0), {}),
    "full": (BF16, dict(bulk_capacity=256, bulk_len=256, tail_capacity=40, tail_len=40), {}),
    "past_a_block": (F32, dict(bulk_capacity=320, bulk_len=65, tail_len=1), {}),
    "one_key": (F32, dict(bulk_len=1, tail_len=0), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    dtype, sizes, options = CASES[case]
    check(make_inputs(0, dtype, **sizes), **options)


def test_the_kernel_is_given_no_empty_buffer(monkeypatch):
    """A bulk or tail of capacity 0 goes to the kernel as one unused position
    (the emulator takes empty buffers; MLX's Metal path is not known to)."""
    seen = []

    def recording(**call):
        seen.append([x.size for x in call["inputs"] if isinstance(x, mx.array)])
        return [mx.zeros(s, d) for s, d in zip(call["output_shapes"], call["output_dtypes"])]

    monkeypatch.setattr(mod, "_KERNEL", recording)
    monkeypatch.setattr(mod, "_KERNEL_COMBINE", recording)
    for sizes in (dict(bulk_capacity=0, bulk_len=0), dict(tail_capacity=0, tail_len=0)):
        mod.quantized_decode_attention_kernel(**make_inputs(16, F32, **sizes))
    assert len(seen) == 4 and all(size > 0 for sizes in seen for size in sizes), seen


def test_strided_query_view():
    """The query heads of the fused projection, read through their strides ("padded":
    the emulator hands every input over with gaps, NaN-filled, on every axis)."""
    inp = make_inputs(1, BF16, heads=8, kv_heads=2, head_dim=64, batch=2)
    inp["q"] = as_projected(inp["q"], 2)
    check(inp, layout="padded")


def test_keys_past_the_lengths_are_never_read():
    """The kernel reads no position past bulk_len or tail_len: NaN there changes nothing
    (the reference's masked matmuls would carry it, so the oracle is the clean call)."""
    inp = make_inputs(2, F32, bulk_len=70, tail_len=3)
    clean = emulated_call(inp)
    dirty = dict(inp)
    nan_after = lambda x, n: mx.where(mx.arange(x.shape[2])[:, None] < n, x, np.nan)  # noqa: E731
    dirty["keys"] = (inp["keys"][0], nan_after(inp["keys"][1], 70), inp["keys"][2])
    dirty["values"] = (inp["values"][0], inp["values"][1], nan_after(inp["values"][2], 70))
    dirty["tail_keys"] = nan_after(inp["tail_keys"], 3)
    dirty["tail_values"] = nan_after(inp["tail_values"], 3)
    assert mx.array_equal(emulated_call(dirty), clean).item()


def test_lengths_are_read_at_run_time():
    """One set of buffers, two lengths: the kernel takes the lengths from the arrays (a
    compiled step passes new ones each token without retracing)."""
    inp = make_inputs(3, F32, bulk_len=100, tail_len=5)
    a = emulated_call(inp)
    b = emulated_call(dict(inp, bulk_len=mx.array(101, mx.int32)))
    assert not mx.array_equal(a, b).item()
    ref = mod.quantized_decode_attention_reference(**dict(inp, bulk_len=mx.array(101, mx.int32)))
    assert runtime_check.relative_error([b], [ref]) <= mod.KERNEL_OP.tolerance[F32]


# ---------------------------------------------------------------------------
# The reference is the definition
# ---------------------------------------------------------------------------
def definition(inp):
    """float64 numpy: dequantize (mx.dequantize, float32 scales), append the tail, softmax
    over the real keys, weighted sum of the values."""
    f32 = mx.float32

    def dequantized(t):
        return np.array(mx.dequantize(t[0], t[1].astype(f32), t[2].astype(f32),
                                      group_size=inp["group_size"], bits=inp["bits"]), np.float64)

    n_bulk, n_tail = int(inp["bulk_len"]), int(inp["tail_len"])
    k = np.concatenate([dequantized(inp["keys"])[:, :, :n_bulk],
                        np.array(inp["tail_keys"].astype(f32), np.float64)[:, :, :n_tail]], axis=2)
    v = np.concatenate([dequantized(inp["values"])[:, :, :n_bulk],
                        np.array(inp["tail_values"].astype(f32), np.float64)[:, :, :n_tail]], axis=2)
    q = np.array(inp["q"].astype(f32), np.float64)
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = inp["scale"] * q @ k.swapaxes(-1, -2)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


@pytest.mark.parametrize("bits,group_size,score_block", [(4, 64, 4096), (8, 32, 64), (2, 128, 100)])
def test_reference_is_the_definition(bits, group_size, score_block, monkeypatch):
    """score_block: the reference's keys dequantized at once (the bulk: 256)."""
    monkeypatch.setattr(mod, "SCORE_BLOCK", score_block)
    inp = make_inputs(4, F32, heads=6, kv_heads=2, head_dim=128, bits=bits,
                      group_size=group_size, bulk_len=150, tail_len=11)
    ref = np.array(mod.quantized_decode_attention_reference(**inp), np.float64)
    want = definition(inp)
    assert np.abs(ref - want).max() <= 1e-5 * np.abs(want).max()


def test_reference_with_only_a_bulk_is_mlx_lms_quantized_attention():
    """No tail, the whole bulk real: mlx-lm's quantized_scaled_dot_product_attention
    (float32 throughout; its order of operations differs)."""
    inp = make_inputs(5, F32, heads=6, kv_heads=2, head_dim=64, bulk_capacity=128,
                      bulk_len=128, tail_capacity=0, tail_len=0)
    ours = mod.quantized_decode_attention_reference(**inp)
    theirs = quantized_scaled_dot_product_attention(
        inp["q"], inp["keys"], inp["values"], scale=inp["scale"], mask=None,
        group_size=inp["group_size"], bits=inp["bits"])
    assert runtime_check.relative_error([ours], [theirs]) <= 1e-5


def test_reference_16_bit_is_the_float32_reference_rounded():
    """Widening is exact: a bfloat16 call is the float32 call on the same values, rounded."""
    inp = make_inputs(6, BF16)
    wide = {k: (tuple(a if a.dtype == mx.uint32 else a.astype(F32) for a in v)
                if isinstance(v, tuple) else v.astype(F32) if isinstance(v, mx.array)
                and v.dtype == BF16 else v) for k, v in inp.items()}
    want = mod.quantized_decode_attention_reference(**wide).astype(BF16)
    assert mx.array_equal(mod.quantized_decode_attention_reference(**inp), want).item()


# ---------------------------------------------------------------------------
# What the dispatcher sends to the reference
# ---------------------------------------------------------------------------
def refuse_both(monkeypatch):
    """Both passes fail if launched (stand-ins for Metal kernels)."""
    refuse_kernel(monkeypatch, mod)
    monkeypatch.setattr(mod, "_KERNEL_COMBINE", mod._KERNEL)


@pytest.mark.parametrize("change", ["bits3", "bits6", "too_many_heads_per_kv", "length_shape",
                                    "tail_dtype"])
def test_calls_the_kernel_does_not_take_go_to_the_reference(change, monkeypatch):
    sizes = dict(bits=3, head_dim=96, group_size=32) if change == "bits3" else \
        dict(bits=6, group_size=32) if change == "bits6" else \
        dict(heads=34, kv_heads=1) if change == "too_many_heads_per_kv" else {}
    inp = make_inputs(7, F32, **sizes)
    if change == "length_shape":
        inp["bulk_len"] = inp["bulk_len"].reshape(1)
    if change == "tail_dtype":
        inp["tail_keys"], inp["tail_values"] = (inp["tail_keys"].astype(BF16),
                                                inp["tail_values"].astype(BF16))
    refuse_both(monkeypatch)
    out = mod.quantized_decode_attention(**inp)
    ref = mod.quantized_decode_attention_reference(**inp)
    assert mx.array_equal(out, ref).item()


def test_without_metal_and_when_turned_off_it_is_the_reference(monkeypatch):
    inp = make_inputs(8, BF16)
    ref = mod.quantized_decode_attention_reference(**inp)
    if not metal_available():
        assert mod._KERNEL is None and mod._KERNEL_COMBINE is None
        assert mx.array_equal(mod.quantized_decode_attention(**inp), ref).item()
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    refuse_both(monkeypatch)
    assert mx.array_equal(mod.quantized_decode_attention(**inp), ref).item()


def test_refused_by_the_run_time_check_it_is_the_reference(monkeypatch):
    inp = make_inputs(9, F16)
    monkeypatch.setattr(mod, "kernel_allowed", lambda op, sizes: False)
    refuse_both(monkeypatch)
    out = mod.quantized_decode_attention(**inp)
    assert mx.array_equal(out, mod.quantized_decode_attention_reference(**inp)).item()


# ---------------------------------------------------------------------------
# The run-time check
# ---------------------------------------------------------------------------
@pytest.fixture
def on_gpu(monkeypatch, tmp_path):
    """The check believes it runs on a GPU; its cache lives in tmp_path."""
    monkeypatch.setattr(runtime_check, "gpu_name", lambda: "Emulated GPU (msl_emu)")
    monkeypatch.setenv("MLX_FALCON_H1_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MLX_FALCON_H1_KERNEL_CHECK", raising=False)
    runtime_check.reset()
    yield tmp_path / runtime_check.CACHE_FILE
    runtime_check.reset()


def test_run_time_check_keys_bits_and_group_size_apart(on_gpu):
    import json

    base = dict(heads=4, kv_heads=2, head_dim=64, bits=4, group_size=64, dtype=F32)
    with emulated(mod, **FAST):
        for sizes in (base, dict(base, bits=8), dict(base, group_size=32)):
            assert runtime_check.kernel_allowed(mod.KERNEL_OP, sizes)
    (entries,) = json.loads(on_gpu.read_text())["devices"].values()
    keys = sorted(key.split(" (kernel ")[0] for key in entries)
    assert keys == ["quantized_decode_attention H4 Hkv2 P64 bits4 gs32 float32",
                    "quantized_decode_attention H4 Hkv2 P64 bits4 gs64 float32",
                    "quantized_decode_attention H4 Hkv2 P64 bits8 gs64 float32"], keys
    assert all(e["ok"] for e in entries.values())


def test_run_time_check_turns_off_a_wrong_combine_pass(on_gpu, monkeypatch):
    """A second pass that weighs its first block wrong: found at the model's sizes,
    the dispatcher then runs the reference."""
    old = "const float w = metal::exp(ml_part[(bh * P + p) * 2] - M);"
    wrong = planted("_COMBINE_SOURCE", old, old.replace("- M);", "- M) * (p == 0 ? 0.5f : 1.0f);"))
    inp = make_inputs(10, F32)
    with emulated(mod, **FAST), pytest.warns(runtime_check.KernelCheckWarning):
        mod._KERNEL_COMBINE = wrong
        out = mod.quantized_decode_attention(**inp)
    assert mx.array_equal(out, mod.quantized_decode_attention_reference(**inp)).item()


def test_the_check_key_covers_the_combine_pass():
    changed = mod.KernelOp(**{**mod.KERNEL_OP.__dict__, "more_specs": (
        dict(mod.KERNEL_SPEC_COMBINE, source=mod._COMBINE_SOURCE + "\n"),)})
    assert runtime_check.source_digest(changed) != runtime_check.source_digest(mod.KERNEL_OP)


# ---------------------------------------------------------------------------
# Planted bugs the tests above must catch
# ---------------------------------------------------------------------------
def planted(source_name, old, new):
    spec = mod.KERNEL_SPEC_COMBINE if source_name == "_COMBINE_SOURCE" else mod.KERNEL_SPEC
    text = spec["header"] if source_name == "_HEADER" else spec["source"]
    assert text.count(old) == 1, old
    key = "header" if source_name == "_HEADER" else "source"
    return msl_emu.metal_kernel(**{**spec, key: text.replace(old, new)}, **FAST)


def run_planted(kernel, inp, slot="_KERNEL"):
    with emulated(mod, **FAST):
        setattr(mod, slot, kernel)
        out = mod.quantized_decode_attention(**inp)
        mx.eval(out)
    return runtime_check.relative_error([out], [mod.quantized_decode_attention_reference(**inp)])


def test_bug_high_bits_first_is_caught():
    bad = planted("_HEADER", "(word >> ((e * BITS) % 32))", "(word >> (32 - BITS - (e * BITS) % 32))")
    assert run_planted(bad, make_inputs(11, F32)) > 1e-2


def test_bug_last_key_of_a_block_dropped_is_caught():
    old = "const int last = metal::min(first + (in_bulk ? bulk_block : tail_block), real);"
    bad = planted("_SOURCE", old, old.replace("tail_block), real)", "tail_block) - 1, real)"))
    assert run_planted(bad, make_inputs(12, F32, bulk_len=256, tail_len=40)) > 1e-3


def test_bug_reading_the_whole_tail_capacity_is_caught():
    old = ": metal::min(static_cast<int>(tail_len), Ct);"
    bad = planted("_SOURCE", old, ": Ct;")
    assert run_planted(bad, make_inputs(13, F32, tail_len=5)) > 1e-2


def test_bug_one_query_head_for_all_is_caught():
    old = "const int64_t qrow = b * q_strides[0] + (kh * R + r) * q_strides[1];"
    bad = planted("_SOURCE", old, old.replace("(kh * R + r)", "(kh * R)"))
    assert run_planted(bad, make_inputs(14, F32, heads=4, kv_heads=2)) > 1e-2


def test_bug_write_past_the_partials_is_caught():
    bad = planted("_SOURCE", "o_part[at * D + e0 + i] = o[r][i];", "o_part[at * D + e0 + i + 1] = o[r][i];")
    with pytest.raises(MSLEmuError, match="out-of-bounds|race"):
        run_planted(bad, make_inputs(15, F32))


def test_kernel_sources_are_lint_clean():
    assert msl_emu.lint(mod._SOURCE, mod._HEADER) == []
    assert msl_emu.lint(mod._COMBINE_SOURCE) == []


def test_a_nan_output_is_an_error_not_a_match():
    """relative_error once took max(0.0, nan) = 0.0: a kernel reading padding (NaN in
    the emulator's "padded" layout) passed every comparison."""
    ref = mx.array([1.0, 2.0])
    assert np.isnan(runtime_check.relative_error([mx.array([np.nan, 2.0])], [ref]))
    assert np.isnan(runtime_check.relative_error([ref, mx.array([np.nan])], [ref, mx.array([1.0])]))
    assert runtime_check.relative_error([mx.array([1.0, 3.0])], [ref]) == 0.5
