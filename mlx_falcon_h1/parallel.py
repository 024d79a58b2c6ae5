"""One Falcon-H1 across several processes with mx.distributed (launched by mlx.launch).

Two splits, as mlx-lm's models offer them: `Model.shard(group)` and
`Model.pipeline(group)` call `shard` and `pipeline` here, and
loading.sharded_load applies them while loading. This module works on a built
model through its attributes and imports nothing else of the package, so the
model can offer both methods without depending on anything above it.

Tensor parallel, `shard(model, group)`: every layer is split by heads across the
N ranks, so each rank holds about 1/N of every layer's weights and the ranks
all-reduce three times per layer.
  - Attention: q, k and v rows by head (each rank keeps H/N query heads and the
    KV heads they read), o_proj by its input columns, all-reduced.
  - Mamba2 mixer: in_proj's five row segments consistently, z, x and dt by SSM
    head and B, C by group (see `_mixer_rows`); conv1d channels, A_log, D, dt_bias
    and the gated-norm weight by the same heads and groups; out_proj by its input
    columns, all-reduced. The SSM itself runs independently per head.
  - MLP: gate and up rows, down columns, all-reduced.
  - Embeddings, the head and the layer norms stay whole on every rank.

Pipeline, `pipeline(model, group)`: each rank holds a contiguous run of layers
(mlx-lm's convention: rank 0 the last ones, the highest rank the first) and
its inner model's `stage` (a PipelineStage) passes the hidden state on with send/recv; the final hidden state is gathered
to every rank, which all compute the logits. For a model that does not fit even
split by heads; only one rank works at a time.

Both leave every rank with the same logits, so mlx-lm's generation (greedy or
seeded sampling) produces the same tokens on all ranks.

Legend: H SSM heads, P head dim, G groups, N state size, R ranks (the group's
size), r this rank.
"""

from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx.utils import tree_map

Ranges = List[Tuple[int, int]]  # half-open [start, stop) row ranges, in order


def _heads_and_groups(heads: int, groups: int, size: int, rank: int):
    """This rank's SSM heads and the B/C groups it keeps for them.

    Returns (first head, local head count, groups kept in order, whether they
    are whole groups: all their heads on this rank). Heads are split contiguously. The kept B/C groups must serve the
    local heads with a uniform heads-per-group, as the scan broadcasts them:
      - R divides G: each rank keeps G/R whole groups (and their heads);
      - otherwise, when the local heads read equal runs of groups (G = 1, or G
        divides R): the groups they read, replicated on the ranks that share them;
      - otherwise (e.g. G = 3 over R = 2): one copy of its group per local head.
    """
    local = heads // size
    first = rank * local
    per_group = heads // groups
    reads = [(first + h) // per_group for h in range(local)]
    runs = []  # [group, heads reading it]
    for g in reads:
        if runs and runs[-1][0] == g:
            runs[-1][1] += 1
        else:
            runs.append([g, 1])
    if len({n for _, n in runs}) == 1:
        kept = [g for g, _ in runs]
        whole = runs[0][1] == per_group
    else:
        kept, whole = reads, False
    return first, local, kept, whole


def _merge(ranges: Ranges) -> Ranges:
    out: Ranges = []
    for start, stop in ranges:
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], stop)
        else:
            out.append((start, stop))
    return out


def _take(w: mx.array, ranges: Ranges) -> mx.array:
    """The rows of `w` (entries, for a vector) in `ranges`, in order, as a new array."""
    parts = [w[start:stop] for start, stop in ranges]
    return mx.contiguous(mx.concatenate(parts) if len(parts) > 1 else parts[0])


def _mixer_rows(mixer, size: int, rank: int):
    """Row ranges of in_proj and channel ranges of conv1d for this rank.

    in_proj rows: z (d) | x (d) | B (G*N) | C (G*N) | dt (H); conv channels:
    x (d) | B (G*N) | C (G*N). Returns (in_proj ranges, conv ranges, head
    range, z/x channel range, local group count, kept groups, whether they are
    whole groups).
    """
    d, P, G, N = mixer.d_ssm, mixer.head_dim, mixer.n_groups, mixer.d_state
    first, local, kept, whole = _heads_and_groups(mixer.n_heads, G, size, rank)
    heads = [(first, first + local)]
    channels = [(first * P, (first + local) * P)]  # z or x channels of these heads

    def group_rows(base):
        return [(base + g * N, base + (g + 1) * N) for g in kept]

    def shift(ranges, base):
        return [(base + a, base + b) for a, b in ranges]

    in_rows = _merge(
        channels
        + shift(channels, d)
        + group_rows(2 * d)
        + group_rows(2 * d + G * N)
        + shift(heads, 2 * d + 2 * G * N)
    )
    conv = _merge(channels + group_rows(d) + group_rows(d + G * N))
    return in_rows, conv, heads, channels, len(kept), kept, whole


class ShardedGatedRMSNorm(nn.Module):
    """model.GatedRMSNorm for a rank that holds only part of a norm group's channels.

    The statistic of each group is a mean over d / G channels that live on
    several ranks: each rank sums its heads' squares per group, the sums are
    all-reduced, and each head reads its group's total. Same math as
    GatedRMSNorm: w * y / sqrt(mean_group(y^2) + eps), gated before or after.
    """

    def __init__(self, norm, weight, head_dim, head_groups, channels, group):
        super().__init__()
        self.weight = weight
        self.eps = norm.eps
        self.norm_before_gate = norm.norm_before_gate
        self.head_dim = head_dim
        self.channels = channels  # d / G: channels per norm group, across all ranks
        self.group = group
        # (local heads, G) one-hot: which norm group each local head belongs to.
        self._onehot = mx.array(
            [[float(g == k) for k in range(norm.groups)] for g in head_groups]
        )

    def __call__(self, y: mx.array, gate: mx.array) -> mx.array:
        # y, gate: (B, L, d_local), computed in float32 like GatedRMSNorm.
        gate = nn.silu(gate.astype(mx.float32))
        y = y.astype(mx.float32)
        if not self.norm_before_gate:
            y = y * gate
        shape = y.shape
        y = y.reshape(*shape[:-1], -1, self.head_dim)  # (B, L, H_local, P)
        partial = mx.square(y).sum(-1) @ self._onehot  # (B, L, G)
        total = mx.distributed.all_sum(partial, group=self.group)
        mean = (total @ self._onehot.T) / self.channels  # (B, L, H_local)
        y = (y * mx.rsqrt(mean + self.eps)[..., None]).reshape(shape)
        y = self.weight.astype(mx.float32) * y
        return y * gate if self.norm_before_gate else y


def _shard_mixer(mixer, group) -> None:
    size, rank = group.size(), group.rank()
    in_rows, conv, heads, channels, local_groups, kept, whole = _mixer_rows(mixer, size, rank)
    per_group = mixer.n_heads // mixer.n_groups  # global heads per group
    local_heads = heads[0][1] - heads[0][0]

    # in_proj's input is whole on every rank: a plain (possibly quantized)
    # Linear with this rank's rows; its bias and quantization scales are per row.
    mixer.in_proj.update(tree_map(lambda w: _take(w, in_rows), mixer.in_proj.parameters()))
    if mixer._mup is not None:
        mixer._mup = _take(mixer._mup, in_rows)
    mixer.conv1d.update(tree_map(lambda w: _take(w, conv), mixer.conv1d.parameters()))
    for name in ("dt_bias", "A_log", "D"):
        setattr(mixer, name, _take(getattr(mixer, name), heads))
    if "norm" in mixer:
        weight = _take(mixer.norm.weight, channels)
        if whole:
            mixer.norm.weight, mixer.norm.groups = weight, local_groups
        else:
            head_groups = [(heads[0][0] + h) // per_group for h in range(local_heads)]
            mixer.norm = ShardedGatedRMSNorm(
                mixer.norm, weight, mixer.head_dim, head_groups,
                mixer.d_ssm // mixer.n_groups, group,
            )  # fmt: skip
    mixer.out_proj = shard_linear(mixer.out_proj, "sharded-to-all", group=group)

    # The sizes the mixer (and its cache) reads, now this rank's.
    mixer.n_heads = local_heads
    mixer.d_ssm = local_heads * mixer.head_dim
    mixer.n_groups = local_groups


def _check_divisible(args, size: int) -> None:
    sizes = {
        "num_attention_heads": args.num_attention_heads,
        "num_key_value_heads": args.num_key_value_heads,
        "mamba_n_heads": args.mamba_n_heads,
        "intermediate_size": args.intermediate_size,
    }
    bad = [f"{k} = {v}" for k, v in sizes.items() if v % size]
    if bad:
        raise ValueError(
            f"tensor parallelism over {size} processes needs {', '.join(sizes)} "
            f"divisible by {size}; this model has {', '.join(bad)}. Use a process "
            "count that divides them, or the pipeline split (--pipeline)."
        )


def shard(model, group: Optional[mx.distributed.Group] = None):
    """Split every layer of `model` by heads across `group` (in place); returns it.

    Call after the weights are loaded (lazily is best: each rank then reads
    only its part when the parameters are evaluated).
    """
    group = group or mx.distributed.init()
    size = group.size()
    if size == 1:
        return model
    _check_divisible(model.args, size)
    model.compile_decode = False  # collectives are not traced into mx.compile (decode.py)
    for layer in model.layers:
        attn = layer.self_attn
        attn.q_proj = shard_linear(attn.q_proj, "all-to-sharded", group=group)
        attn.k_proj = shard_linear(attn.k_proj, "all-to-sharded", group=group)
        attn.v_proj = shard_linear(attn.v_proj, "all-to-sharded", group=group)
        attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
        attn.n_heads //= size
        attn.n_kv_heads //= size

        _shard_mixer(layer.mamba, group)

        mlp = layer.feed_forward
        mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
        mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
        mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
    return model


# --- pipeline -------------------------------------------------------------------


class PipelineStage:
    """This rank's part in a pipeline: FalconH1Model.__call__ receives the hidden
    state before its layers and sends it on after them."""

    def __init__(self, rank: int, size: int, group):
        self.rank, self.size, self.group = rank, size, group

    def receive(self, h: mx.array) -> mx.array:
        """The previous stage's hidden state (the highest rank runs the first layers)."""
        if self.rank < self.size - 1:
            h = mx.distributed.recv_like(h, self.rank + 1, group=self.group)
        return h

    def send(self, h: mx.array, cache) -> mx.array:
        """Pass `h` on; every rank gets rank 0's (the last stage's) hidden state."""
        if self.rank > 0:
            h = mx.distributed.send(h, self.rank - 1, group=self.group)
            if cache[-1] is not None:
                # mlx-lm evaluates only the cache while it prefills a long prompt:
                # tie the send to it, or the next stage would wait forever.
                cache[-1].conv_state = mx.depends(cache[-1].conv_state, h)
        return mx.distributed.all_gather(h, group=self.group)[: h.shape[0]]


def pipeline(
    model,
    group: Optional[mx.distributed.Group] = None,
    split: Optional[Sequence[int]] = None,
):
    """Keep only this rank's layers of `model` (in place); returns it.

    The inner model keeps its layer list with the other ranks' layers None, so
    parameter names keep their layer numbers; `Model.layers` (hence make_cache)
    are this rank's.

    split: layers per rank (rank 0 first), default an even split with the
    extra layers on the low ranks. Rank r runs the layers after those of ranks
    r+1 ... R-1, as in mlx-lm, so rank 0 holds the last layers.
    """
    group = group or mx.distributed.init()
    size, rank = group.size(), group.rank()
    inner = model.model
    if inner.stage is not None:
        raise ValueError("this model is already split into a pipeline")
    layers = list(inner.layers)
    if split is None:
        base, extra = divmod(len(layers), size)
        split = [base + (r < extra) for r in range(size)]
    split = list(split)
    if len(split) != size or any(s <= 0 for s in split) or sum(split) != len(layers):
        raise ValueError(
            f"pipeline split {split}: need {size} positive layer counts summing to "
            f"{len(layers)}"
        )
    start = sum(split[rank + 1 :])
    end = start + split[rank]
    model.compile_decode = False  # sends and receives are not traced into mx.compile
    inner.stage = PipelineStage(rank, size, group)
    inner.layers = [None] * start + layers[start:end]
    return model
