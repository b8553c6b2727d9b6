"""Model configuration: one frozen dataclass and the named presets.

The presets live here (not in gin) so that Python users, tests and the parameter-count check share
one
source of truth; gin picks a preset by name and may override fields (`model_config.overrides`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from polylm_jax.typecheck import check_fields

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# The attention implementations, one list: ModelConfig checks it, kernels/dispatch.py runs them.
ATTENTION_IMPLS = ("xla", "pallas_gpu", "pallas_tpu", "cudnn", "auto")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


_MOVED_OUT = (
  "loss_chunk",
  "attention_block_q",
  "attention_block_k",
  "attention_bwd_block_q",
  "attention_bwd_block_k",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The released PolyLM architecture (GPT-2 style decoder) and how it is computed."""

  name: str
  vocab_size: int
  max_length: int  # number of learned absolute positions
  num_layers: int
  d_model: int
  num_heads: int
  d_ff: int
  layer_norm_eps: float = 1e-5
  init_std: float = 0.006  # normal(0, 0.006) for every weight matrix and embedding, as released
  # Matmul dtype. Parameters, LayerNorm, softmax and the residual stream stay float32 whatever this
  # is.
  dtype: str = "bfloat16"
  scan_layers: bool = True  # one compiled layer body (lax.scan) instead of num_layers copies
  remat_policy: str = "none"  # what the backward pass may keep from the forward pass, per layer
  attention_impl: str = "xla"
  attention_interpret: bool = False  # run Pallas kernels in the interpreter (tests on CPU)

  def __post_init__(self):
    check_fields(self)
    if self.d_model % self.num_heads:
      raise ValueError(
        f"ModelConfig({self.name}).d_model={self.d_model} is not divisible by "
        f"num_heads={self.num_heads}"
      )
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
        f"ModelConfig.remat_policy={self.remat_policy!r}: expected one of {REMAT_POLICIES}"
      )
    if self.dtype not in DTYPES:
      raise ValueError(f"ModelConfig.dtype={self.dtype!r}: expected one of {tuple(DTYPES)}")
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(
        f"ModelConfig.attention_impl={self.attention_impl!r}: expected one of {ATTENTION_IMPLS}"
      )
    for field in ("vocab_size", "max_length", "num_layers", "d_model", "num_heads", "d_ff"):
      if getattr(self, field) <= 0:
        raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")

  @classmethod
  def from_dict(cls, fields: dict) -> "ModelConfig":
    """The config recorded in a checkpoint or export. Settings of how the model is computed that
    moved out of ModelConfig (the loss: trainer.loss.LossConfig; the attention kernels' block
    sizes: TrainerConfig.attention_blocks) are dropped from records written before they moved."""
    return cls(**{k: v for k, v in fields.items() if k not in _MOVED_OUT})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  def replace(self, **changes: Any) -> "ModelConfig":
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ValueError(
        f"unknown ModelConfig field(s) {unknown}; known: "
        f"{[f.name for f in dataclasses.fields(self)]}"
      )
    return dataclasses.replace(self, **changes)


PRESETS: dict[str, ModelConfig] = {
  "polylm_1.7b": ModelConfig(
    "polylm_1.7b",
    vocab_size=256000,
    max_length=2048,
    num_layers=24,
    d_model=2048,
    num_heads=16,
    d_ff=8192,
  ),
  "polylm_13b": ModelConfig(
    "polylm_13b",
    vocab_size=256000,
    max_length=2048,
    num_layers=40,
    d_model=5120,
    num_heads=40,
    d_ff=20480,
  ),
  # CPU benchmarks: the shape the train-step benchmark compares against transformers' GPT-2.
  "small": ModelConfig(
    "small", vocab_size=32000, max_length=512, num_layers=6, d_model=512, num_heads=8, d_ff=2048
  ),
  # Tests and the quickstart: every dimension divisible by 8 so any 8-device mesh shards it.
  "tiny": ModelConfig(
    "tiny",
    vocab_size=4096,
    max_length=128,
    num_layers=2,
    d_model=64,
    num_heads=4,
    d_ff=256,
    dtype="float32",
  ),
}


def model_config(
  preset: str = "tiny", overrides: dict[str, Any] | None = None, vocab_size: int | None = None
) -> ModelConfig:
  """A named preset with optional field overrides (the gin entry point for the model);
  `vocab_size` on its own (a sweep's vocabulary arms set it beside a run's overrides)."""
  if preset not in PRESETS:
    raise ValueError(
      f"model_config.preset={preset!r} is not a known preset; known: {sorted(PRESETS)}"
    )
  config = PRESETS[preset].replace(**(overrides or {}))
  return config if vocab_size is None else config.replace(vocab_size=vocab_size)


def analytic_param_count(cfg: ModelConfig) -> int:
  """Parameter count written out by hand (tied LM head, so the head adds nothing)."""
  d, f = cfg.d_model, cfg.d_ff
  per_layer = (
    2 * d  # ln_1 scale + bias
    + d * 3 * d
    + 3 * d  # fused qkv kernel + bias
    + d * d
    + d  # attention output projection + bias
    + 2 * d  # ln_2
    + d * f
    + f  # mlp fc
    + f * d
    + d
  )  # mlp proj
  return cfg.vocab_size * d + cfg.max_length * d + cfg.num_layers * per_layer + 2 * d
