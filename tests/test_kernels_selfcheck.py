"""`python -m mlx_falcon_h1.selfcheck`: what it reports with and without Metal."""

import pytest

from mlx_falcon_h1 import msl_emu, selfcheck
from mlx_falcon_h1.kernels import (conv1d, gated_norm, metal_available, mixer_step, quantized_attention,
                                   residual_norm, rope, ssd_scan, ssm_step)
from mlx_falcon_h1.msl_emu.testing import emulated

TINY = dict(batch=1, length=5, heads=2, head_dim=16, groups=1, n=16, width=4)


@pytest.mark.skipif(metal_available(), reason="checks the message shown without Metal")
def test_without_metal_it_says_what_it_could_not_check(capsys, monkeypatch):
    monkeypatch.setattr(selfcheck, "EMULATOR_SIZES", TINY)
    code = selfcheck.main([])
    text = capsys.readouterr().out
    assert "NOT CHECKED: Metal is not available" in text
    if msl_emu.available():
        assert code == 0 and "selfcheck: passed" in text
        assert text.count(" ok") == 16  # 8 kernels x 2 dtypes, in the emulator
    else:
        assert "no g++" in text


@pytest.mark.skipif(not msl_emu.available(), reason="the emulator needs g++")
def test_gpu_report_runs_with_the_emulator_standing_in_for_metal(capsys):
    with emulated(conv1d, ssd_scan, ssm_step, mixer_step, gated_norm, rope, residual_norm, quantized_attention,
                  schedules=("forward",)):
        assert selfcheck.check_gpu(sizes=TINY, reps=1)
    lines = capsys.readouterr().out.splitlines()
    assert "speedup" in lines[0] and len(lines) == 17
    assert all(line.endswith("ok") for line in lines[1:])
