"""Parameter-holding building blocks: every parameter is created through `param()` so that it
carries its logical axis names (read by `polylm_jax.sharding`)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx


def param(value: jax.Array, names: Sequence[str | None]) -> nnx.Param:
  if len(names) != value.ndim:
    raise ValueError(f"logical names {tuple(names)} do not match parameter shape {value.shape}")
  # eager_sharding=False: placement is decided once, by the trainer's jit out_shardings, from these
  # names; creating the model outside a mesh (tests, export) must also work.
  return nnx.Param(value, sharding_names=tuple(names), eager_sharding=False)


def normal(rngs: nnx.Rngs, std: float, shape: Sequence[int], names: Sequence[str | None]):
  return param(std * jax.random.normal(rngs.params(), tuple(shape), jnp.float32), names)


def zeros(shape: Sequence[int], names: Sequence[str | None]):
  return param(jnp.zeros(tuple(shape), jnp.float32), names)


def ones(shape: Sequence[int], names: Sequence[str | None]):
  return param(jnp.ones(tuple(shape), jnp.float32), names)


class LayerNorm(nnx.Module):
  """LayerNorm with scale and bias, always computed in float32 (the residual stream's dtype)."""

  def __init__(self, dim: int, eps: float):
    self.scale = ones((dim,), ("embed",))
    self.bias = zeros((dim,), ("embed",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
