"""AdamW as PolyLM was trained: b=(0.9, 0.95), eps 1e-8, weight decay 1e-4, clip 1.0, warmup +
cosine.

The learning rate is applied by the train step (`lr = schedule(step)`), not inside optax, so that
the schedule follows the data step even when a non-finite update is skipped (PaLM-style skipping).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from polylm_jax.typecheck import check_fields


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  peak_lr: float = 6e-5
  end_lr: float = 6e-6  # cosine floor
  warmup_steps: int = 2000
  decay_steps: int | None = None  # warmup + cosine length; None = the run's total steps
  schedule: str = "cosine"  # after warmup: "cosine" (to end_lr at decay_steps) or "constant"
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 1e-4
  # As Megatron-LM (which PolyLM was trained with) does: decay every weight matrix, the token and
  # position embeddings included, and no bias or LayerNorm parameter (the 1-D parameters).
  decay_embeddings: bool = True  # wte / wpe
  decay_norms_and_biases: bool = False
  grad_clip_norm: float = 1.0  # global norm; <= 0 disables clipping
  grad_accum_steps: int = 1  # microbatches per update, each 1/grad_accum_steps of the global batch

  def __post_init__(self):
    check_fields(self)
    if self.grad_accum_steps < 1:
      raise ValueError(f"OptimizerConfig.grad_accum_steps={self.grad_accum_steps} must be >= 1")
    if self.warmup_steps < 0:
      raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} must be >= 0")
    if self.schedule not in ("cosine", "constant"):
      raise ValueError(
        f"OptimizerConfig.schedule={self.schedule!r}: expected 'cosine' or 'constant'"
      )


def lr_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
  if cfg.schedule == "constant":
    return optax.join_schedules(
      [
        optax.linear_schedule(0.0, cfg.peak_lr, max(cfg.warmup_steps, 1)),
        optax.constant_schedule(cfg.peak_lr),
      ],
      [cfg.warmup_steps],
    )
  decay = cfg.decay_steps or total_steps
  if decay <= cfg.warmup_steps:
    raise ValueError(
      f"OptimizerConfig: decay_steps ({decay}, or the run's total steps) must exceed "
      f"warmup_steps ({cfg.warmup_steps})"
    )
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=cfg.peak_lr,
    warmup_steps=cfg.warmup_steps,
    decay_steps=decay,
    end_value=cfg.end_lr,
  )


def _is_decayed(path, cfg: OptimizerConfig) -> bool:
  keys = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  leaf = keys[-1]
  if leaf in ("wte", "wpe"):
    return cfg.decay_embeddings
  if leaf.endswith("bias") or keys[-2:-1] and keys[-2].startswith("ln_"):
    return cfg.decay_norms_and_biases
  return True


def decay_mask(params, cfg: OptimizerConfig):
  return jax.tree_util.tree_map_with_path(lambda p, _: _is_decayed(p, cfg), params)


# The transformations of the chain, by name, and the setting that switches each on: recorded in
# checkpoints so that a resume with another chain (another optimizer-state structure) can say what
# changed instead of failing on a tree mismatch.
CHAIN_SETTINGS = {
  "clip-by-global-norm": "grad_clip_norm",
  "adam": None,
  "weight-decay": "weight_decay",
}


def chain_names(cfg: OptimizerConfig) -> list[str]:
  names = ["clip-by-global-norm"] if cfg.grad_clip_norm > 0 else []
  names.append("adam")
  if cfg.weight_decay:
    names.append("weight-decay")
  return names


def make_optimizer(cfg: OptimizerConfig, params) -> optax.GradientTransformation:
  """Direction only (clip -> Adam -> + wd * param); the step multiplies by -lr."""
  make = {
    "clip-by-global-norm": lambda: optax.clip_by_global_norm(cfg.grad_clip_norm),
    "adam": lambda: optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
    "weight-decay": lambda: optax.add_decayed_weights(
      cfg.weight_decay, mask=decay_mask(params, cfg)
    ),
  }
  return optax.chain(*(make[name]() for name in chain_names(cfg)))


def scale_by_lr(updates, lr: jax.Array):
  return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
