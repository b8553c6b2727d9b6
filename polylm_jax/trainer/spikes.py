"""Loss-spike detection, on device, from running statistics of the loss and the gradient norm.

A step is a spike when, after `warmup_steps` finite steps, its loss exceeds both mean + z * std and
mean * (1 + min_relative_jump) of the exponential moving statistics; with
`grad_norm_z_threshold` set, a gradient norm past the same kind of threshold is a spike too (off by
default: pre-clipping gradient norms are spiky early in training without anything being wrong).
Spike
steps do not update the statistics. What happens then is `mode`:
  off       nothing is computed
  log       the update is applied; the trainer logs the event
  skip      the update is not applied (like a non-finite step); logged
  rollback  the update is not applied; the trainer restores the last checkpoint and skips the data
            up to `rollback_skip_batches` batches past the spike (as PaLM did); logged
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from polylm_jax.typecheck import check_fields

MODES = ("off", "log", "skip", "rollback")


@dataclasses.dataclass(frozen=True)
class SpikeConfig:
  mode: str = "log"
  ema_decay: float = 0.99
  z_threshold: float = 6.0
  grad_norm_z_threshold: float | None = None
  min_relative_jump: float = 0.1
  warmup_steps: int = 50
  rollback_skip_batches: int = 200

  def __post_init__(self):
    check_fields(self)
    if self.mode not in MODES:
      raise ValueError(f"SpikeConfig.mode={self.mode!r}: expected one of {MODES}")
    if not 0.0 < self.ema_decay < 1.0:
      raise ValueError(f"SpikeConfig.ema_decay={self.ema_decay} must be in (0, 1)")

  @property
  def blocks_update(self) -> bool:
    return self.mode in ("skip", "rollback")


# stats: [count, loss mean, loss second moment, grad-norm mean, grad-norm second moment]
def initial_stats() -> jax.Array:
  return jnp.zeros((5,), jnp.float32)


def _threshold(mean, second, z: float, cfg: SpikeConfig):
  std = jnp.sqrt(jnp.maximum(second - mean * mean, 0.0))
  return jnp.maximum(mean + z * std, mean * (1.0 + cfg.min_relative_jump))


def detect(
  stats: jax.Array, loss: jax.Array, grad_norm: jax.Array, finite: jax.Array, cfg: SpikeConfig
) -> tuple[jax.Array, jax.Array, dict]:
  """(is_spike, new_stats, numbers for the log)."""
  count, lm, l2, gm, g2 = stats[0], stats[1], stats[2], stats[3], stats[4]
  # Bias-corrected EMAs (as Adam's) so the statistics are usable from the first steps.
  correction = 1.0 - cfg.ema_decay ** jnp.maximum(count, 1.0)
  loss_thr = _threshold(lm / correction, l2 / correction, cfg.z_threshold, cfg)
  active = count >= cfg.warmup_steps
  spike = finite & active & (loss > loss_thr)
  if cfg.grad_norm_z_threshold is not None:
    grad_thr = _threshold(gm / correction, g2 / correction, cfg.grad_norm_z_threshold, cfg)
    spike = spike | (finite & active & (grad_norm > grad_thr))
  else:
    grad_thr = jnp.asarray(jnp.inf, jnp.float32)
  learn = finite & ~spike
  d = cfg.ema_decay
  ema = lambda old, x: jnp.where(learn, d * old + (1.0 - d) * x, old)
  new = jnp.stack(
    [
      count + learn.astype(jnp.float32),
      ema(lm, loss),
      ema(l2, loss * loss),
      ema(gm, grad_norm),
      ema(g2, grad_norm * grad_norm),
    ]
  )
  return spike, new, {"loss_threshold": loss_thr, "grad_norm_threshold": grad_thr}
