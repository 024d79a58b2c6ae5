"""One model across two processes (mx.distributed, ring backend over loopback).

tests/helpers/distributed_worker.py runs each checkpoint split by heads
(`Model.shard`) and by layers (`Model.pipeline`) under `mlx.launch -n 2`, and
unsplit in one plain process; both ranks must give the one-process logits
(a full call, and a cache fed in pieces) within float32 tolerance, and the same
greedy tokens from mlx-lm's generate_step.
"""

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import TINY, assert_close_logits, make_checkpoint, make_tokenizer
from mlx_falcon_h1 import Model, ModelArgs
from mlx_falcon_h1.parallel import _heads_and_groups

WORKER = Path(__file__).parent / "helpers" / "distributed_worker.py"

# Each exercises one way the Mamba groups fall across two ranks (6 SSM heads).
CHECKPOINTS = {
    # One group: B and C replicated, the gated norm's statistic all-reduced.
    "groups1-norm": dict(mamba_rms_norm=True, mamba_norm_before_gate=False),
    # Two groups: one whole group (and its norm group) per rank; every bias on.
    "groups2-bias": dict(
        seed=1, mamba_n_groups=2, mamba_rms_norm=True, mamba_norm_before_gate=True,
        attention_bias=True, mlp_bias=True, mamba_proj_bias=True, projectors_bias=True,
    ),
    # Three groups: a rank's heads read 1.5 groups, so it keeps one per head;
    # three layers: the pipeline gives rank 0 the last two.
    "groups3-3layers": dict(seed=2, mamba_n_groups=3, mamba_rms_norm=True, num_hidden_layers=3),
}  # fmt: skip


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _launcher() -> list:
    script = Path(sys.executable).parent / "mlx.launch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlx._distributed_utils.launch"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    folders = []
    for name, overrides in CHECKPOINTS.items():
        folder = root / name
        make_checkpoint(folder, **overrides)
        make_tokenizer(folder)
        folders.append(str(folder))
    single, double = root / "one", root / "two"
    single.mkdir()
    double.mkdir()

    run = dict(capture_output=True, text=True, timeout=300)
    done = subprocess.run([sys.executable, str(WORKER), str(single), *folders], **run)
    assert done.returncode == 0, done.stderr[-3000:]
    launch = _launcher() + ["-n", "2", "--backend", "ring", "--starting-port", str(_free_port_pair())]
    done = subprocess.run(launch + ["--", sys.executable, str(WORKER), str(double), *folders], **run)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 0 of 2: done" in done.stdout and "rank 1 of 2: done" in done.stdout
    return single, double


@pytest.mark.parametrize("split", ["tensor", "pipeline"])
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_two_processes_match_one(results, name, split):
    single, double = results
    alone = np.load(single / f"{name}.{split}.rank0.npz")
    cached = int(alone["cached_length"])
    for rank in (0, 1):
        split_run = np.load(double / f"{name}.{split}.rank{rank}.npz")
        assert_close_logits(split_run["full"], alone["full"], rel=1e-5)
        assert_close_logits(split_run["pieces"], alone["full"][:, :cached], rel=1e-5)
        np.testing.assert_array_equal(split_run["tokens"], alone["tokens"])


# --- the plan, without processes ----------------------------------------------------


@pytest.mark.parametrize(
    "heads, groups, size, expected",
    [
        # (first head, local heads, groups kept, whole groups)
        (32, 2, 2, [(0, 16, [0], True), (16, 16, [1], True)]),  # the 34B over 2 Macs
        (24, 1, 2, [(0, 12, [0], False), (12, 12, [0], False)]),  # 0.5B: B, C replicated
        (8, 2, 4, [(0, 2, [0], False), (2, 2, [0], False), (4, 2, [1], False), (6, 2, [1], False)]),
        (6, 3, 2, [(0, 3, [0, 0, 1], False), (3, 3, [1, 2, 2], False)]),  # a copy per head
        (8, 4, 2, [(0, 4, [0, 1], True), (4, 4, [2, 3], True)]),
    ],
)
def test_heads_and_groups_per_rank(heads, groups, size, expected):
    assert [_heads_and_groups(heads, groups, size, r) for r in range(size)] == expected


class FakeGroup:
    """Enough of mx.distributed.Group for splitting without communicating."""

    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def size(self):
        return self._size

    def rank(self):
        return self._rank


def test_shard_refuses_sizes_that_do_not_divide():
    model = Model(ModelArgs.from_dict(TINY))  # 2 KV heads cannot go to 4 ranks
    with pytest.raises(ValueError, match="num_key_value_heads = 2"):
        model.shard(FakeGroup(4, 0))


def test_pipeline_keeps_checkpoint_names_of_its_layers():
    """mlx-lm's convention: rank 0 runs the last layers, the low ranks take the
    extra ones; names keep their layer numbers."""
    args = ModelArgs.from_dict({**TINY, "num_hidden_layers": 5})
    stages = []
    for rank in (0, 1):
        model = Model(args).pipeline(FakeGroup(2, rank))
        names = {k.split(".")[2] for k, _ in tree_flatten(model.parameters()) if ".layers." in k}
        stages.append(sorted(int(n) for n in names))
        assert len(model.layers) == len(model.make_cache()) == len(stages[-1])
    assert stages == [[2, 3, 4], [0, 1]]
    with pytest.raises(ValueError, match="split"):
        Model(args).pipeline(FakeGroup(2, 0), split=[4, 2])
