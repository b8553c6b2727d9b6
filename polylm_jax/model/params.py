"""Parameters as plain nested dicts: creation, abstract shapes, logical axes, scan <-> unscanned.

The trainer, optimizer, checkpoints and export all see parameters as a nested dict of arrays
(`nnx.State.to_pure_dict()`); the NNX module is rebuilt around them with `nnx.merge(graphdef,
params)`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from polylm_jax.config import ModelConfig
from polylm_jax.kernels.common import BlockSizes
from polylm_jax.model.transformer import PolyLM

Params = dict[str, Any]


def make_model(cfg: ModelConfig, seed: int = 0, blocks: BlockSizes = BlockSizes()) -> PolyLM:
  return PolyLM(cfg, rngs=nnx.Rngs(seed), blocks=blocks)


def init_params(cfg: ModelConfig, seed: int = 0) -> Params:
  """Fresh parameters. Inside `jax.jit(..., out_shardings=...)` they are created already sharded."""
  return nnx.state(make_model(cfg, seed), nnx.Param).to_pure_dict()


def _abstract_state(cfg: ModelConfig, blocks: BlockSizes = BlockSizes()):
  model = nnx.eval_shape(lambda: make_model(cfg, 0, blocks))
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, state


def graphdef(cfg: ModelConfig, blocks: BlockSizes = BlockSizes()):
  """The model's structure (with the attention kernels' block sizes) without its parameters."""
  return _abstract_state(cfg, blocks)[0]


def abstract_params(cfg: ModelConfig) -> Params:
  """ShapeDtypeStructs of every parameter, with no allocation (works for 13B on a laptop)."""
  return _abstract_state(cfg)[1].to_pure_dict()


def logical_axes(cfg: ModelConfig) -> Params:
  """Same tree as the parameters, each leaf the tuple of logical axis names of that parameter."""
  state = _abstract_state(cfg)[1]
  return jax.tree.map(
    lambda v: tuple(v.sharding_names), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  ).to_pure_dict()


def apply(gdef, params: Params, tokens, positions=None, segment_ids=None) -> jax.Array:
  return model(gdef, params)(tokens, positions, segment_ids)


def model(gdef, params: Params) -> PolyLM:
  """The NNX module over these parameters (for its hidden() / logits() halves)."""
  return nnx.merge(gdef, params)


def scan_to_unscanned(params: Params, num_layers: int) -> Params:
  """{'blocks': {leaf: [L, ...]}} -> {'blocks': {0: {leaf: [...]}, ..., L-1: ...}}."""
  out = dict(params)
  stacked = params["blocks"]
  out["blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(num_layers)}
  return out


def unscanned_to_scan(params: Params) -> Params:
  out = dict(params)
  per_layer = params["blocks"]
  keys = sorted(per_layer)
  if keys != list(range(len(keys))):
    raise ValueError(f"unscanned params: 'blocks' keys must be 0..L-1, got {keys}")
  out["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[per_layer[i] for i in keys])
  return out
