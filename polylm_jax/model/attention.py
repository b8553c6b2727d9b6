"""The one attention entry point of the model.

Every attention call in the model goes through `attention()`, which dispatches on `impl`. `xla` is the
plain reference (fp32 scores and softmax); the Pallas kernels of `polylm_jax/kernels` register further
implementations in `_IMPLS`. An implementation that cannot honour the request (platform, dtype,
shape, segment ids) must raise, never fall back.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_IMPLS: dict[str, AttentionFn] = {}


def register(name: str, fn: AttentionFn) -> None:
  _IMPLS[name] = fn


def attention(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *,
              causal: bool = True, impl: str = "xla") -> jax.Array:
  """Multi-head attention over packed sequences.

  Args:
    q, k, v: [batch, length, heads, head_dim], any float dtype (the result has q's dtype).
    segment_ids: [batch, length] int; tokens attend only within their own segment, so documents
      packed into one row never see each other. None means one segment per row.
    causal: mask out future positions.
    impl: which implementation (`xla`, or a registered kernel).
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(f"attention: q, k, v must all be [batch, length, heads, head_dim]; got "
                     f"{q.shape}, {k.shape}, {v.shape}")
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(f"attention: segment_ids must be [batch, length] = {q.shape[:2]}, "
                     f"got {segment_ids.shape}")
  if impl not in _IMPLS:
    raise ValueError(f"attention_impl={impl!r} is not available; registered: {sorted(_IMPLS)}")
  return _IMPLS[impl](q, k, v, segment_ids, causal=causal)


def mask(segment_ids: jax.Array | None, length: int, causal: bool) -> jax.Array | None:
  """[batch or 1, 1, q_len, kv_len] boolean: True where a query may attend to a key."""
  allowed = None
  if causal:
    pos = jnp.arange(length)
    allowed = (pos[:, None] >= pos[None, :])[None, None]
  if segment_ids is not None:
    same = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    allowed = same if allowed is None else allowed & same
  return allowed


def xla_attention(q, k, v, segment_ids, *, causal: bool = True) -> jax.Array:
  """Reference implementation: materialises [B, H, T, T] scores in float32."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  allowed = mask(segment_ids, q.shape[1], causal)
  if allowed is not None:
    # Finite, not -inf: a fully masked row (cannot happen with causal + own segment) stays NaN-free.
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


register("xla", xla_attention)
