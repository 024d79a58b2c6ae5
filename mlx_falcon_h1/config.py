"""Falcon-H1's configuration (config.json) as the model reads it: ModelArgs.

Field names and defaults copy transformers' FalconH1Config; derived sizes are
filled in and every size checked once, here, so that a config whose sizes do
not fit together fails naming the field, not deep in a matmul. model.py
re-exports ModelArgs (mlx-lm's model interface).
"""

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

from mlx_lm.models.base import BaseModelArgs

from .folder_format import runtime_overrides


class ConfigError(ValueError):
    """A config.json that is not Falcon-H1 or whose sizes do not fit together."""


@dataclass
class ModelArgs(BaseModelArgs):
    # Field names and defaults copy transformers' FalconH1Config, so a key
    # missing from config.json means what it means there.
    model_type: str = "falcon_h1"
    vocab_size: int = 128000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = 8
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 8192
    attention_bias: bool = False
    mlp_bias: bool = False
    projectors_bias: bool = False
    rope_theta: Optional[float] = None
    rope_parameters: Optional[Dict[str, Any]] = None
    rope_scaling: Optional[Dict[str, Any]] = None
    mamba_d_ssm: Optional[int] = 1024
    mamba_n_heads: int = 128
    mamba_d_head: Union[int, str] = "auto"
    mamba_n_groups: int = 1
    mamba_d_state: int = 256
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_chunk_size: int = 256
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    mamba_norm_before_gate: bool = True
    mamba_rms_norm: bool = False
    time_step_limit: Optional[Sequence[float]] = (0.0, math.inf)
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    mlp_multipliers: List[float] = field(default_factory=lambda: [1.0, 1.0])
    ssm_multipliers: List[float] = field(default_factory=lambda: [1.0] * 5)
    # Written by our converter: what it did to the weights (see convert/).
    mlx_falcon_h1: Optional[Dict[str, Any]] = None

    def __post_init__(self):
        def fail(message):
            raise ConfigError(f"config.json: {message}")

        if self.model_type != "falcon_h1":
            fail(f"model_type is {self.model_type!r}, expected 'falcon_h1'")
        if self.hidden_act != "silu":
            fail(f"hidden_act is {self.hidden_act!r}; Falcon-H1 uses 'silu'")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.mamba_d_ssm is None:
            self.mamba_d_ssm = self.mamba_expand * self.hidden_size
        if self.mamba_d_head == "auto":
            if self.mamba_d_ssm % self.mamba_n_heads:
                fail(
                    f"mamba_n_heads = {self.mamba_n_heads} does not divide "
                    f"mamba_d_ssm = {self.mamba_d_ssm} (mamba_d_head is 'auto')"
                )
            self.mamba_d_head = self.mamba_d_ssm // self.mamba_n_heads
        if self.time_step_limit is None:
            self.time_step_limit = (0.0, math.inf)
        self.time_step_limit = tuple(float(t) for t in self.time_step_limit)
        self.rope_base, self.rope_scaling_config = self._resolve_rope()

        checks = [
            (
                self.num_attention_heads % self.num_key_value_heads == 0,
                f"num_key_value_heads = {self.num_key_value_heads} does not divide "
                f"num_attention_heads = {self.num_attention_heads}",
            ),
            (self.head_dim % 2 == 0, f"head_dim = {self.head_dim} must be even (RoPE)"),
            (
                self.mamba_d_head * self.mamba_n_heads == self.mamba_d_ssm,
                f"mamba_d_head x mamba_n_heads = {self.mamba_d_head} x "
                f"{self.mamba_n_heads} != mamba_d_ssm = {self.mamba_d_ssm}",
            ),
            (
                self.mamba_n_heads % self.mamba_n_groups == 0,
                f"mamba_n_groups = {self.mamba_n_groups} does not divide "
                f"mamba_n_heads = {self.mamba_n_heads}",
            ),
            (self.mamba_d_conv >= 1, f"mamba_d_conv = {self.mamba_d_conv} must be >= 1"),
            (
                self.mamba_chunk_size >= 1,
                f"mamba_chunk_size = {self.mamba_chunk_size} must be >= 1",
            ),
            (
                len(self.mlp_multipliers) == 2,
                f"mlp_multipliers has {len(self.mlp_multipliers)} values, expected 2",
            ),
            (
                len(self.ssm_multipliers) == 5,
                f"ssm_multipliers has {len(self.ssm_multipliers)} values, expected 5 "
                "(z, x, B, C, dt)",
            ),
            (
                len(self.time_step_limit) == 2,
                f"time_step_limit = {list(self.time_step_limit)} must be [min, max]",
            ),
        ]
        for ok, message in checks:
            if not ok:
                fail(message)
        # A format-1 folder of our converter restates what its weights carry.
        for name, value in runtime_overrides(vars(self)).items():
            setattr(self, name, value)

    def _resolve_rope(self):
        # transformers < 5 writes rope_theta (+ rope_scaling); transformers 5 writes
        # rope_parameters = {rope_theta, rope_type, ...}. Read both, never guess.
        params = self.rope_parameters or {}
        base = params.get("rope_theta", self.rope_theta)
        if self.rope_theta is not None and base != self.rope_theta:
            raise ConfigError(
                f"config.json: rope_theta = {self.rope_theta} disagrees with "
                f"rope_parameters.rope_theta = {params['rope_theta']}"
            )
        scaling = self.rope_scaling
        if params.get("rope_type", "default") != "default":
            scaling = params
        return (10000.0 if base is None else float(base)), scaling

    @property
    def conv_dim(self) -> int:
        return self.mamba_d_ssm + 2 * self.mamba_n_groups * self.mamba_d_state
