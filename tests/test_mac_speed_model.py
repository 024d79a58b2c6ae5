"""The Mac speed model (mac_speed_model.py): its arithmetic, the launch counts it
is fed (ours and mlx-lm's), and its calibration on mlx-lm's published figures."""

import math

import pytest

from mlx_falcon_h1 import benchmark
from mlx_falcon_h1.mac_speed_model import (
    CHIPS, PUBLISHED, T_LAUNCH_RANGE_S, Chip, calibrate, command_buffers, predicted_tokens_per_s,
    seconds_per_token, state_bytes_per_token,
)  # fmt: skip


def test_arithmetic_by_hand():
    chip = Chip(bandwidth_gbps=100, max_ops_per_buffer=50, max_mb_per_buffer=50, source="test")
    # 1,000 launches: ceil(1000 / 51) = 20 buffers by ops; 2e9 bytes: ceil(2e9 / (50 * 2**20)) = 39 by MB.
    assert command_buffers(1000, 2e9, chip) == 39
    assert command_buffers(1000, 1e6, chip) == 20
    assert command_buffers(3, 10, chip) == 1
    # 1000 x 3 us + 39 x 20 us + 2e9 B / 100 GB/s = 3 ms + 0.78 ms + 20 ms
    assert seconds_per_token(1000, 2e9, chip, 3e-6, 20e-6) == pytest.approx(23.78e-3, rel=1e-12)
    assert predicted_tokens_per_s(1000, 2e9, chip, 3e-6, 20e-6) == pytest.approx(1 / 23.78e-3, rel=1e-12)
    # calibrate solves the same equation for t_launch
    assert calibrate(1 / 23.78e-3, 1000, 2e9, chip, 20e-6) == pytest.approx(3e-6, rel=1e-9)
    with pytest.raises(ValueError, match="alone take longer"):
        calibrate(1000.0, 1000, 2e9, chip)  # 1 ms a token: less than the 20 ms of reading


def test_state_bytes_by_hand():
    config = dict(num_hidden_layers=2, mamba_d_ssm=8, mamba_n_groups=1, mamba_d_state=4, mamba_d_conv=4,
                  mamba_n_heads=2, mamba_d_head=4, num_key_value_heads=1, head_dim=8)  # fmt: skip
    conv = 3 * (8 + 2 * 4) * 2  # K-1 inputs of the conv channels, 2-byte items
    ssm = 2 * 4 * 4 * 4  # H x P x N float32
    kv = 2 * 1 * 8 * 10 * 2  # K and V at 10 tokens
    assert state_bytes_per_token(config, 10, 2) == 2 * (2 * (conv + ssm) + kv)


@pytest.mark.parametrize("bits", [None, 4])
def test_counter_tiny_ours_and_mlx_lm(tmp_path, bits):
    """Counted on 1- and 2-layer folders as users load them: positive, a fixed part
    and a per-layer part, ours at most mlx-lm's."""
    counts = benchmark._shape_launches("tiny", bits, tmp_path)
    for name in ("ours", "mlx-lm"):
        assert counts[name]["per_layer"] > 0 and counts[name]["fixed"] > 0
    assert counts["ours"]["per_layer"] <= counts["mlx-lm"]["per_layer"]


@pytest.fixture(scope="module")
def tiny_90m(tmp_path_factory):
    return benchmark.mac_prediction(tmp_path_factory.mktemp("models"), shapes=["Tiny-90M"])


def test_calibration_reproduces_the_published_figures(tiny_90m, capsys):
    assert {c["chip"] for c in tiny_90m["calibration"]} == {p.chip for p in PUBLISHED}
    row = next(r for r in tiny_90m["rows"] if r["weights"] == "4-bit")
    assert row["mlx-lm_per_token"] == row["mlx-lm_fixed"] + 24 * row["mlx-lm_per_layer"]
    for point, fit in zip(PUBLISHED, tiny_90m["calibration"]):
        assert fit["model_tps_at_fit"] == pytest.approx(point.tokens_per_s, rel=1e-9)
        # the table's mlx-lm prediction on a calibrated chip is the published figure itself
        assert row["predicted_tps"][point.chip]["mlx-lm"] == [pytest.approx(point.tokens_per_s, rel=1e-9)]
        # an effective per-launch cost of a few microseconds: the published range, within 2x
        assert T_LAUNCH_RANGE_S[0] / 2 < fit["fitted_t_launch_us"] * 1e-6 < T_LAUNCH_RANGE_S[1] * 2
    # fewer launches and the same bytes can only predict more tokens per second
    for chip in CHIPS:
        ours, theirs = row["predicted_tps"][chip]["ours"], row["predicted_tps"][chip]["mlx-lm"]
        if row["ours_per_token"] <= row["mlx-lm_per_token"] and row["bytes_per_token"]["ours"] <= row[
                "bytes_per_token"]["mlx-lm"]:  # fmt: skip
            assert all(a >= b for a, b in zip(ours, theirs))
        assert all(math.isfinite(v) and v > 0 for v in ours + theirs)
    benchmark.print_mac_prediction(tiny_90m)
    out = capsys.readouterr().out
    assert "PREDICTED" in out and "| Tiny-90M | 4-bit |" in out and "fitted t_launch" in out
