"""FLOPs per token and model FLOPs utilisation (MFU).

Training FLOPs per token = 6 * N_matmul + 6 * L * T * d, where
  N_matmul = L * (d*3d + d*d + 2*d*d_ff) + V*d   (every weight used in a matmul, the tied LM head
             included; embedding lookups and LayerNorm/bias work are not matmuls and are left out),
  6 = 2 FLOPs per multiply-add x (1 forward + 2 backward matmuls),
  attention scores and weighted sum cost 2 * (2*T*d) per token per layer forward; causal masking
  halves that (only the lower triangle is useful), x3 for forward + backward -> 6*L*T*d.
This is the PaLM (appendix B) accounting with the causal half: it counts useful work, so remat
recomputation or a kernel's wasted masked blocks lower MFU rather than inflate it.
"""

from __future__ import annotations

import logging

import jax

from polylm_jax.config import ModelConfig

# Dense bf16 peak FLOP/s per device (vendor figures, no sparsity), matched as substrings of
# jax.Device.device_kind. Override with TrainerConfig.peak_flops_per_device.
PEAK_FLOPS_BY_DEVICE_KIND = (
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("L4", 121e12),
  ("TPU v6 lite", 918e12),
  ("TPU v5 lite", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),
  ("TPU v4", 275e12),
)


def matmul_params(cfg: ModelConfig) -> int:
  d, f = cfg.d_model, cfg.d_ff
  return cfg.num_layers * (d * 3 * d + d * d + 2 * d * f) + cfg.vocab_size * d


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  return 6.0 * matmul_params(cfg) + 6.0 * cfg.num_layers * seq_len * cfg.d_model


def peak_flops_per_device(device: jax.Device, override: float | None = None) -> float | None:
  """Peak FLOP/s of one device: the override if given, else the table, else None (logged)."""
  if override:
    return float(override)
  kind = device.device_kind
  for key, flops in PEAK_FLOPS_BY_DEVICE_KIND:
    if key in kind:
      logging.info(
        "MFU: peak %.3g FLOP/s per device for device kind %r (table entry %r)", flops, kind, key
      )
      return flops
  # A CPU has no table entry by design; an accelerator missing from the table is worth a warning.
  log = logging.info if device.platform == "cpu" else logging.warning
  log(
    "MFU not reported: device kind %r is not in the peak-FLOP/s table; set "
    "TrainerConfig.peak_flops_per_device to report it",
    kind,
  )
  return None
