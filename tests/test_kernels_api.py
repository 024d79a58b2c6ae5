"""Each kernel module exports foo, foo_kernel and foo_reference with one signature and docstring."""

import inspect

import pytest

mx = pytest.importorskip("mlx.core")
from mlx_falcon_h1 import kernels  # noqa: E402
from mlx_falcon_h1.kernels import (conv1d, gated_norm, mixer_step, quantized_attention,  # noqa: E402
                                   residual_norm, rope, ssd_scan, ssm_step)

OPS = [(conv1d, "causal_conv1d"), (ssd_scan, "ssd_scan"), (ssm_step, "ssm_step"),
       (mixer_step, "mixer_step"), (gated_norm, "gated_norm"), (rope, "rope_qk"),
       (residual_norm, "residual_rms_norm"), (quantized_attention, "quantized_decode_attention")]
# The ops model.py calls (gated_norm is mixer_step's second dispatch;
# quantized_decode_attention the --kv-bits cache's, quantized_kv.py).
MODEL_OPS = [op for _, op in OPS if op not in ("gated_norm", "quantized_decode_attention")]


@pytest.mark.parametrize("module,op", OPS, ids=[op for _, op in OPS])
def test_triplet_shares_signature_and_docstring(module, op):
    fns = [getattr(module, op + suffix) for suffix in ("", "_kernel", "_reference")]
    assert len({str(inspect.signature(f)) for f in fns}) == 1
    assert len({f.__doc__ for f in fns}) == 1 and fns[0].__doc__


@pytest.mark.parametrize("module,op", OPS, ids=[op for _, op in OPS])
def test_kernel_built_once_at_import_and_none_without_metal(module, op):
    for name in [n for n in vars(module) if n.startswith("_KERNEL")]:  # a second pass too
        assert (getattr(module, name) is None) == (not kernels.metal_available()), name
    if module._KERNEL is None:
        positional = [p for p in inspect.signature(getattr(module, op)).parameters.values()
                      if p.kind == p.POSITIONAL_OR_KEYWORD]  # keyword-only ones have defaults
        with pytest.raises(RuntimeError, match="needs Metal"):
            getattr(module, op + "_kernel")(*([None] * len(positional)))


def test_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "0")
    assert not kernels.kernels_enabled()
    monkeypatch.setenv("MLX_FALCON_H1_KERNELS", "1")
    assert kernels.kernels_enabled()
    monkeypatch.delenv("MLX_FALCON_H1_KERNELS")
    assert kernels.kernels_enabled()


def test_model_calls_the_dispatchers():
    from mlx_falcon_h1 import model

    src = inspect.getsource(model)
    for op in MODEL_OPS:
        assert f"{op}(" in src and f"{op}_reference(" not in src
