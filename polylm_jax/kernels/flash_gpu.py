"""Flash attention for GPUs in Pallas (Triton lowering): forward, and backward as two kernels
(dq; dk and dv), tied together with `jax.custom_vjp`.

Layout [batch, length, heads, head_dim] as the model produces it (no transposes). One program per
(batch, head, block of queries) — or of keys for dk/dv — loops over the other axis' blocks:
- causal: the loop stops at the diagonal (forward, dq) or starts there (dk/dv), so blocks the
  causal mask leaves empty are never loaded;
- packing: a block pair whose segment-id ranges do not overlap is skipped with `lax.cond`
  (a cheap, always-safe test: if any query and key share a segment, their ranges overlap).
Scores, softmax statistics and accumulators are float32; the log-sum-exp is saved for backward.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from polylm_jax.kernels.common import (
  MASK_VALUE,
  block_mask,
  dot,
  dot_t,
  dot_tn,
  entry_point,
  online_softmax_step,
)


def _compiler_params(head_dim: int, block_q: int, block_k: int):
  # From a block sweep on Hopper at head_dim 128 (docs/kernels.md): 8 warps pay off only for
  # 128x128 tiles, 4 for every smaller tile; 3 pipeline stages are never worse than 2.
  from jax.experimental.pallas import triton as plgpu

  big_tile = head_dim > 64 and block_q * block_k >= 128 * 128
  return plgpu.CompilerParams(num_warps=8 if big_tile else 4, num_stages=3)


def _ranges_overlap(seg_a, seg_b):
  return (jnp.max(seg_b) >= jnp.min(seg_a)) & (jnp.min(seg_b) <= jnp.max(seg_a))


def _fwd_kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, scale, causal, block_q, block_k):
  i = pl.program_id(2)
  length = k_ref.shape[0]
  q = q_ref[...]
  q_pos = i * block_q + jnp.arange(block_q)
  q_seg = seg_ref[pl.ds(i * block_q, block_q)]
  carry = (
    jnp.full((block_q,), -jnp.inf, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
    jnp.zeros(q.shape, jnp.float32),
  )

  def body(j, carry):
    k_seg = seg_ref[pl.ds(j * block_k, block_k)]

    def compute(carry):
      k = k_ref[pl.ds(j * block_k, block_k), :]
      v = v_ref[pl.ds(j * block_k, block_k), :]
      s = dot_t(q, k) * scale
      k_pos = j * block_k + jnp.arange(block_k)
      s = jnp.where(block_mask(q_pos, k_pos, q_seg, k_seg, causal), s, MASK_VALUE)
      return online_softmax_step(s, v, *carry)

    return lax.cond(_ranges_overlap(q_seg, k_seg), compute, lambda c: c, carry)

  num_k = lax.div((i + 1) * block_q + block_k - 1, block_k) if causal else length // block_k
  m, denom, acc = lax.fori_loop(0, num_k, body, carry)
  o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(denom)


def _dq_kernel(
  q_ref,
  k_ref,
  v_ref,
  seg_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  *,
  scale,
  causal,
  block_q,
  block_k,
):
  i = pl.program_id(2)
  length = k_ref.shape[0]
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = i * block_q + jnp.arange(block_q)
  q_seg = seg_ref[pl.ds(i * block_q, block_q)]

  def body(j, dq):
    k_seg = seg_ref[pl.ds(j * block_k, block_k)]

    def compute(dq):
      k = k_ref[pl.ds(j * block_k, block_k), :]
      v = v_ref[pl.ds(j * block_k, block_k), :]
      k_pos = j * block_k + jnp.arange(block_k)
      mask = block_mask(q_pos, k_pos, q_seg, k_seg, causal)
      p = jnp.where(mask, jnp.exp(dot_t(q, k) * scale - lse[:, None]), 0.0)
      ds = p * (dot_t(do, v) - delta[:, None])
      return dq + dot(ds.astype(k.dtype), k)

    return lax.cond(_ranges_overlap(q_seg, k_seg), compute, lambda d: d, dq)

  num_k = lax.div((i + 1) * block_q + block_k - 1, block_k) if causal else length // block_k
  dq = lax.fori_loop(0, num_k, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  seg_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  *,
  scale,
  causal,
  block_q,
  block_k,
):
  j = pl.program_id(2)
  length = q_ref.shape[0]
  k, v = k_ref[...], v_ref[...]
  k_pos = j * block_k + jnp.arange(block_k)
  k_seg = seg_ref[pl.ds(j * block_k, block_k)]

  def body(i, carry):
    q_seg = seg_ref[pl.ds(i * block_q, block_q)]

    def compute(carry):
      dk, dv = carry
      q = q_ref[pl.ds(i * block_q, block_q), :]
      do = do_ref[pl.ds(i * block_q, block_q), :]
      lse = lse_ref[pl.ds(i * block_q, block_q)]
      delta = delta_ref[pl.ds(i * block_q, block_q)]
      q_pos = i * block_q + jnp.arange(block_q)
      mask = block_mask(q_pos, k_pos, q_seg, k_seg, causal)
      p = jnp.where(mask, jnp.exp(dot_t(q, k) * scale - lse[:, None]), 0.0)
      dv = dv + dot_tn(p.astype(do.dtype), do)
      ds = p * (dot_t(do, v) - delta[:, None])
      dk = dk + dot_tn(ds.astype(q.dtype), q)
      return dk, dv

    return lax.cond(_ranges_overlap(q_seg, k_seg), compute, lambda c: c, carry)

  first_q = lax.div(j * block_k, block_q) if causal else 0
  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(first_q, length // block_q, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _specs(block, length, head_dim):
  """BlockSpecs over [B, T, H, D] (a block of `block` rows, or all rows) and [B, H, T] / [B, T]."""
  rows = pl.BlockSpec((None, block, None, head_dim), lambda b, h, i: (b, i, h, 0))
  full = pl.BlockSpec((None, length, None, head_dim), lambda b, h, i: (b, 0, h, 0))
  stat_rows = pl.BlockSpec((None, None, block), lambda b, h, i: (b, h, i))
  stat_full = pl.BlockSpec((None, None, length), lambda b, h, i: (b, h, 0))
  seg = pl.BlockSpec((None, length), lambda b, h, i: (b, 0))
  return rows, full, stat_rows, stat_full, seg


def _forward(q, k, v, seg, causal, blocks, interpret):
  batch, length, heads, head_dim = q.shape
  block_q, block_k = blocks.for_length(length)
  rows, full, stat_rows, _, seg_spec = _specs(block_q, length, head_dim)
  kernel = functools.partial(
    _fwd_kernel, scale=head_dim**-0.5, causal=causal, block_q=block_q, block_k=block_k
  )
  return pl.pallas_call(
    kernel,
    grid=(batch, heads, length // block_q),
    in_specs=[rows, full, full, seg_spec],
    out_specs=[rows, stat_rows],
    out_shape=[
      jax.ShapeDtypeStruct(q.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, heads, length), jnp.float32),
    ],
    compiler_params=None if interpret else _compiler_params(head_dim, block_q, block_k),
    interpret=interpret,
    name="polylm_flash_fwd_gpu",
  )(q, k, v, seg)


def _backward(q, k, v, seg, o, lse, do, causal, blocks, interpret):
  batch, length, heads, head_dim = q.shape
  block_q, block_k = blocks.backward().for_length(length)
  scale = head_dim**-0.5
  # delta_i = sum_d o_id * do_id: one fused XLA reduction, read by both kernels.
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  params = None if interpret else _compiler_params(head_dim, block_q, block_k)
  rows_q, full, stat_q, stat_full, seg_spec = _specs(block_q, length, head_dim)
  dq = pl.pallas_call(
    functools.partial(_dq_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k),
    grid=(batch, heads, length // block_q),
    in_specs=[rows_q, full, full, seg_spec, rows_q, stat_q, stat_q],
    out_specs=rows_q,
    out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    compiler_params=params,
    interpret=interpret,
    name="polylm_flash_dq_gpu",
  )(q, k, v, seg, do, lse, delta)
  rows_k = _specs(block_k, length, head_dim)[0]
  dk, dv = pl.pallas_call(
    functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k),
    grid=(batch, heads, length // block_k),
    in_specs=[full, rows_k, rows_k, seg_spec, full, stat_full, stat_full],
    out_specs=[rows_k, rows_k],
    out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    compiler_params=params,
    interpret=interpret,
    name="polylm_flash_dkv_gpu",
  )(q, k, v, seg, do, lse, delta)
  return dq, dk, dv


# [B, T, H, D] attention on a GPU (Triton lowering); see common.entry_point.
flash_attention = entry_point("pallas_gpu", _forward, _backward)
