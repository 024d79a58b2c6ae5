"""The per-layer cache of a Falcon-H1 layer: attention K/V, conv state, SSM state.

Every Falcon-H1 layer runs attention and a Mamba2 mixer side by side, so one
cache object holds both kinds of memory. To mlx-lm's attention helpers it looks
like a KV cache (`update_and_fetch`, `offset`, `make_mask`); the mixer reads and
writes `conv_state` (B, K-1, conv_dim) and `ssm_state` (B, H, P, N, float32).
"""

from mlx_lm.models.cache import KVCache, _BaseCache


class HybridCache(_BaseCache):
    def __init__(self):
        self.kv = KVCache()
        self.conv_state = None
        self.ssm_state = None

    # Attention side: delegate to mlx-lm's step-growing KV cache.
    @property
    def offset(self):
        return self.kv.offset

    def update_and_fetch(self, keys, values):
        return self.kv.update_and_fetch(keys, values)

    def make_mask(self, *args, **kwargs):
        return self.kv.make_mask(*args, **kwargs)

    def size(self):
        return self.kv.size()

    def empty(self):
        return self.kv.empty() and self.ssm_state is None

    @property
    def state(self):
        # mlx-lm evaluates exactly these arrays after each step.
        kv = [] if self.kv.empty() else list(self.kv.state[:2])
        ssm = [] if self.ssm_state is None else [self.conv_state, self.ssm_state]
        return kv + ssm

    @property
    def nbytes(self):
        ssm = 0 if self.ssm_state is None else self.conv_state.nbytes + self.ssm_state.nbytes
        return self.kv.nbytes + ssm
