"""The one attention entry point of the model.

Every attention over a whole sequence (training, evaluation, the prefill of generation) goes through
`attention()`; a decode step, a few new queries against the KV cache, uses `cached_attention()`
(plain XLA: there is no sequence to tile). `xla` is the plain reference (fp32
scores and softmax), defined here; the Pallas kernels (`pallas_gpu`, `pallas_tpu`), `cudnn` and
`auto` are dispatched by `polylm_jax.kernels.dispatch`. An implementation that cannot honour the
request (platform, dtype, shape, segment ids) raises; nothing falls back silently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from polylm_jax.kernels import dispatch
from polylm_jax.kernels.common import BlockSizes


def attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  segment_ids: jax.Array | None,
  *,
  causal: bool = True,
  impl: str = "xla",
  interpret: bool = False,
  blocks: BlockSizes = BlockSizes(),
) -> jax.Array:
  """Multi-head attention over packed sequences.

  Args:
    q, k, v: [batch, length, heads, head_dim], any float dtype (the result has q's dtype).
    segment_ids: [batch, length] int; tokens attend only within their own segment, so documents
      packed into one row never see each other. None means one segment per row.
    causal: mask out future positions.
    impl: `xla`, `pallas_gpu`, `pallas_tpu`, `cudnn` or `auto` (see kernels/dispatch.py).
    interpret: run a Pallas kernel in the interpreter (any platform; for tests).
    blocks: kernel block sizes.
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(
      f"attention: q, k, v must all be [batch, length, heads, head_dim]; got "
      f"{q.shape}, {k.shape}, {v.shape}"
    )
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(
      f"attention: segment_ids must be [batch, length] = {q.shape[:2]}, got {segment_ids.shape}"
    )
  impl = dispatch.resolve(
    impl, q, packed=segment_ids is not None, interpret=interpret, blocks=blocks
  )
  if impl == "xla":
    return xla_attention(q, k, v, segment_ids, causal=causal)
  return dispatch.run_kernel(
    impl, q, k, v, segment_ids, causal=causal, blocks=blocks, interpret=interpret
  )


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
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def cached_attention(
  q: jax.Array,
  cache_k: jax.Array,
  cache_v: jax.Array,
  slot: jax.Array,
  start: jax.Array,
  new_k: jax.Array | None = None,
  new_v: jax.Array | None = None,
) -> jax.Array:
  """Decode-time attention (XLA; a few query rows need no kernel). q [B, T, H, K] are the tokens
  at cache slots slot..slot+T-1; each attends to the cache from its row's `start` slot on (the
  slots before `start` hold left padding) and causally to the new tokens. The cache is
  [B, H, S, K] (heads before slots: one contiguous matrix per head) and only read.

  Two ways to hand over the new tokens' keys and values, for the two cache layouts:
  - `new_k`, `new_v` [B, T, H, K] given: the cache holds the slots before `slot` only (a stacked
    cache is written once after all layers: a write inside the layer scan copies it);
  - not given: they are already written at slot..slot+T-1 (a per-layer cache, written in place).
  Softmax in float32 over both parts without concatenating them."""
  scale = q.shape[-1] ** -0.5
  f32, low = jnp.float32, jnp.finfo(jnp.float32).min
  t = q.shape[1]
  old = jnp.einsum("bqhd,bhkd->bhqk", q, cache_k, preferred_element_type=f32) * scale
  k_slot = jnp.arange(cache_k.shape[2])[None, None, :]
  # the newest slot each query sees in the cache: its own when written there, else the one before
  newest = slot + (jnp.arange(t) if new_k is None else jnp.full((t,), -1))[None, :, None]
  visible = (k_slot <= newest) & (k_slot >= start[:, None, None])  # [B, T, S]
  old = jnp.where(visible[:, None], old, low)
  if new_k is None or new_v is None:
    probs = jax.nn.softmax(old, axis=-1).astype(cache_v.dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", probs, cache_v, preferred_element_type=f32)
    return out.astype(q.dtype)
  new = jnp.einsum("bqhd,bkhd->bhqk", q, new_k, preferred_element_type=f32) * scale
  new = jnp.where(jnp.tril(jnp.ones((t, t), bool))[None, None], new, low)
  top = jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True))
  p_old, p_new = jnp.exp(old - top), jnp.exp(new - top)
  total = p_old.sum(-1, keepdims=True) + p_new.sum(-1, keepdims=True)
  out = jnp.einsum(
    "bhqk,bhkd->bqhd", (p_old / total).astype(cache_v.dtype), cache_v, preferred_element_type=f32
  ) + jnp.einsum(
    "bhqk,bkhd->bqhd", (p_new / total).astype(new_v.dtype), new_v, preferred_element_type=f32
  )
  return out.astype(q.dtype)
