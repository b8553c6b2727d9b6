"""PolyLM model: config, NNX modules, parameter helpers (no seqio/tensorflow/gin needed)."""

from polylm_jax.config import PRESETS, ModelConfig, analytic_param_count, model_config
from polylm_jax.model.attention import attention
from polylm_jax.model.params import (
  abstract_params,
  init_params,
  logical_axes,
  make_model,
  scan_to_unscanned,
  unscanned_to_scan,
)
from polylm_jax.model.transformer import PolyLM

__all__ = [
  "PRESETS",
  "ModelConfig",
  "PolyLM",
  "abstract_params",
  "analytic_param_count",
  "attention",
  "init_params",
  "logical_axes",
  "make_model",
  "model_config",
  "scan_to_unscanned",
  "unscanned_to_scan",
]
