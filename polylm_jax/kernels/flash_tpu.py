"""Flash attention for TPUs in Pallas (Mosaic): forward, dq and dk/dv kernels with `jax.custom_vjp`.

Mosaic tiles the last two dims of every block on (8 sublanes x 128 lanes), which shapes the layout:
- q, k, v are transposed to [batch, heads, length, head_dim] so a block is [block, head_dim];
- segment ids come as [B, T, 128] for queries (lane-broadcast) and [B, 8, T] for keys, so the
  [block_q, block_k] mask is a plain compare; block_k must be a multiple of 128 (compiled);
- the softmax statistics (m, l, and the saved log-sum-exp) are kept 128 lanes wide, which costs
  [B, H, T, 128] float32 for lse and delta in HBM (as in JAX's reference TPU kernel).
The grid's last axis walks key blocks (forward, dq) or query blocks (dk/dv) and accumulates in VMEM
scratch. Blocks the causal mask leaves empty, and block pairs whose segment-id ranges do not
overlap (per-block min/max, scalar-prefetched into SMEM), are skipped with `pl.when`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from polylm_jax.kernels.common import (
  MASK_VALUE,
  BlockSizes,
  dot,
  dot_t,
  entry_point,
)

LANES, SUBLANES = 128, 8


def _should_run(b, qi, kj, qmin, qmax, kmin, kmax, *, causal, block_q, block_k):
  overlap = (kmax[b, kj] >= qmin[b, qi]) & (kmin[b, kj] <= qmax[b, qi])
  if causal:  # some key of the block is not after the block's last query
    overlap = overlap & (kj * block_k <= qi * block_q + block_q - 1)
  return overlap


def _mask(qseg_ref, kseg_ref, qi, kj, *, causal, block_q, block_k):
  q_seg = qseg_ref[...]  # [block_q, 128], every lane the same
  k_seg = kseg_ref[...][:1]  # [1, block_k]
  if block_k >= LANES:
    q_seg = jnp.tile(q_seg, (1, block_k // LANES))
  else:
    q_seg = q_seg[:, :block_k]
  mask = q_seg == k_seg
  if causal:
    rows = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0) + qi * block_q
    cols = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1) + kj * block_k
    mask = mask & (cols <= rows)
  return mask


def _lane_slice(x, width):
  """[rows, 128] statistic (all lanes equal) as [rows, width] for broadcasting."""
  if width >= LANES:
    return jnp.tile(x, (1, width // LANES))
  return x[:, :width]


def _fwd_kernel(
  qmin,
  qmax,
  kmin,
  kmax,
  q_ref,
  k_ref,
  v_ref,
  qseg_ref,
  kseg_ref,
  o_ref,
  lse_ref,
  m_scr,
  l_scr,
  acc_scr,
  *,
  scale,
  causal,
  block_q,
  block_k,
):
  b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when(
    _should_run(b, qi, kj, qmin, qmax, kmin, kmax, causal=causal, block_q=block_q, block_k=block_k)
  )
  def _step():
    q, k, v = q_ref[...], k_ref[...], v_ref[...]
    s = dot_t(q, k) * scale
    s = jnp.where(
      _mask(qseg_ref, kseg_ref, qi, kj, causal=causal, block_q=block_q, block_k=block_k),
      s,
      MASK_VALUE,
    )
    m_prev, l_prev = m_scr[...], l_scr[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp(m_prev - m_next)
    p = jnp.exp(s - _lane_slice(m_next, block_k))
    l_scr[...] = correction * l_prev + jnp.sum(p, axis=1, keepdims=True)
    m_scr[...] = m_next
    head_dim = acc_scr.shape[-1]
    acc_scr[...] = acc_scr[...] * _lane_slice(correction, head_dim) + dot(p.astype(v.dtype), v)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish():
    denom = l_scr[...]
    o_ref[...] = (acc_scr[...] / _lane_slice(denom, acc_scr.shape[-1])).astype(o_ref.dtype)
    lse_ref[...] = m_scr[...] + jnp.log(denom)


def _probabilities(q, k, lse, qseg_ref, kseg_ref, qi, kj, *, scale, causal, block_q, block_k):
  s = dot_t(q, k) * scale
  mask = _mask(qseg_ref, kseg_ref, qi, kj, causal=causal, block_q=block_q, block_k=block_k)
  return jnp.where(mask, jnp.exp(s - _lane_slice(lse, block_k)), 0.0)


def _dq_kernel(
  qmin,
  qmax,
  kmin,
  kmax,
  q_ref,
  k_ref,
  v_ref,
  qseg_ref,
  kseg_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dq_ref,
  dq_scr,
  *,
  scale,
  causal,
  block_q,
  block_k,
):
  b, qi, kj = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(kj == 0)
  def _init():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when(
    _should_run(b, qi, kj, qmin, qmax, kmin, kmax, causal=causal, block_q=block_q, block_k=block_k)
  )
  def _step():
    k, v, do = k_ref[...], v_ref[...], do_ref[...]
    p = _probabilities(
      q_ref[...],
      k,
      lse_ref[...],
      qseg_ref,
      kseg_ref,
      qi,
      kj,
      scale=scale,
      causal=causal,
      block_q=block_q,
      block_k=block_k,
    )
    ds = p * (dot_t(do, v) - _lane_slice(delta_ref[...], block_k))
    dq_scr[...] += dot(ds.astype(k.dtype), k)

  @pl.when(kj == pl.num_programs(3) - 1)
  def _finish():
    dq_ref[...] = (dq_scr[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(
  qmin,
  qmax,
  kmin,
  kmax,
  q_ref,
  k_ref,
  v_ref,
  qseg_ref,
  kseg_ref,
  do_ref,
  lse_ref,
  delta_ref,
  dk_ref,
  dv_ref,
  dk_scr,
  dv_scr,
  *,
  scale,
  causal,
  block_q,
  block_k,
):
  b, kj, qi = pl.program_id(0), pl.program_id(2), pl.program_id(3)

  @pl.when(qi == 0)
  def _init():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when(
    _should_run(b, qi, kj, qmin, qmax, kmin, kmax, causal=causal, block_q=block_q, block_k=block_k)
  )
  def _step():
    q, k, v, do = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
    p = _probabilities(
      q,
      k,
      lse_ref[...],
      qseg_ref,
      kseg_ref,
      qi,
      kj,
      scale=scale,
      causal=causal,
      block_q=block_q,
      block_k=block_k,
    )
    dv_scr[...] += dot(p.T.astype(do.dtype), do)
    ds = p * (dot_t(do, v) - _lane_slice(delta_ref[...], block_k))
    dk_scr[...] += dot(ds.T.astype(q.dtype), q)

  @pl.when(qi == pl.num_programs(3) - 1)
  def _finish():
    dk_ref[...] = (dk_scr[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def _block_ranges(seg, block):
  b, t = seg.shape
  blocks = seg.reshape(b, t // block, block)
  return blocks.min(-1), blocks.max(-1)


def _layout(q, k, v, seg, blocks):
  """Kernel-side arrays: [B, H, T, D] tensors, lane/sublane-broadcast segment ids, block ranges."""
  block_q, block_k = blocks.for_length(q.shape[1])
  to_bhtd = lambda x: jnp.swapaxes(x, 1, 2)
  qseg = jnp.broadcast_to(seg[:, :, None], (*seg.shape, LANES))
  kseg = jnp.broadcast_to(seg[:, None, :], (seg.shape[0], SUBLANES, seg.shape[1]))
  ranges = (*_block_ranges(seg, block_q), *_block_ranges(seg, block_k))
  return to_bhtd(q), to_bhtd(k), to_bhtd(v), qseg, kseg, ranges, block_q, block_k


def _call(kernel, grid, in_specs, out_specs, out_shape, scratch, interpret, name):
  grid_spec = pltpu.PrefetchScalarGridSpec(
    num_scalar_prefetch=4, grid=grid, in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch
  )
  return pl.pallas_call(
    kernel,
    grid_spec=grid_spec,
    out_shape=out_shape,
    name=name,
    compiler_params=pltpu.CompilerParams(
      dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
    ),
    interpret=pltpu.InterpretParams() if interpret else False,
  )


def _specs(block_q, block_k, head_dim, *, kv_major: bool):
  """BlockSpecs indexed by (b, h, outer, inner); outer walks q blocks (or k blocks if kv_major)."""
  if kv_major:
    qi = lambda o, i: i
    kj = lambda o, i: o
  else:
    qi = lambda o, i: o
    kj = lambda o, i: i
  q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, o, i, *_: (b, h, qi(o, i), 0))
  k_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, o, i, *_: (b, h, kj(o, i), 0))
  stat = pl.BlockSpec((None, None, block_q, LANES), lambda b, h, o, i, *_: (b, h, qi(o, i), 0))
  qseg = pl.BlockSpec((None, block_q, LANES), lambda b, h, o, i, *_: (b, qi(o, i), 0))
  kseg = pl.BlockSpec((None, SUBLANES, block_k), lambda b, h, o, i, *_: (b, 0, kj(o, i)))
  return q_spec, k_spec, stat, qseg, kseg


def _forward(q, k, v, seg, causal, blocks, interpret):
  batch, length, heads, head_dim = q.shape
  qt, kt, vt, qseg, kseg, ranges, block_q, block_k = _layout(q, k, v, seg, blocks)
  q_spec, k_spec, stat, qseg_spec, kseg_spec = _specs(block_q, block_k, head_dim, kv_major=False)
  kernel = functools.partial(
    _fwd_kernel, scale=head_dim**-0.5, causal=causal, block_q=block_q, block_k=block_k
  )
  o, lse = _call(
    kernel,
    (batch, heads, length // block_q, length // block_k),
    [q_spec, k_spec, k_spec, qseg_spec, kseg_spec],
    [q_spec, stat],
    [
      jax.ShapeDtypeStruct(qt.shape, q.dtype),
      jax.ShapeDtypeStruct((batch, heads, length, LANES), jnp.float32),
    ],
    [
      pltpu.VMEM((block_q, LANES), jnp.float32),
      pltpu.VMEM((block_q, LANES), jnp.float32),
      pltpu.VMEM((block_q, head_dim), jnp.float32),
    ],
    interpret,
    "polylm_flash_fwd_tpu",
  )(*ranges, qt, kt, vt, qseg, kseg)
  return jnp.swapaxes(o, 1, 2), lse


def _backward(q, k, v, seg, o, lse, do, causal, blocks, interpret):
  batch, length, heads, head_dim = q.shape
  qt, kt, vt, qseg, kseg, ranges, block_q, block_k = _layout(q, k, v, seg, blocks.backward())
  dot_ = jnp.swapaxes(do, 1, 2)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = jnp.broadcast_to(delta[..., None], (*delta.shape, LANES))
  scale = head_dim**-0.5
  nq, nk = length // block_q, length // block_k
  q_spec, k_spec, stat, qseg_spec, kseg_spec = _specs(block_q, block_k, head_dim, kv_major=False)
  dq = _call(
    functools.partial(_dq_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k),
    (batch, heads, nq, nk),
    [q_spec, k_spec, k_spec, qseg_spec, kseg_spec, q_spec, stat, stat],
    q_spec,
    jax.ShapeDtypeStruct(qt.shape, q.dtype),
    [pltpu.VMEM((block_q, head_dim), jnp.float32)],
    interpret,
    "polylm_flash_dq_tpu",
  )(*ranges, qt, kt, vt, qseg, kseg, dot_, lse, delta)
  q_spec, k_spec, stat, qseg_spec, kseg_spec = _specs(block_q, block_k, head_dim, kv_major=True)
  dk, dv = _call(
    functools.partial(_dkv_kernel, scale=scale, causal=causal, block_q=block_q, block_k=block_k),
    (batch, heads, nk, nq),
    [q_spec, k_spec, k_spec, qseg_spec, kseg_spec, q_spec, stat, stat],
    [k_spec, k_spec],
    [jax.ShapeDtypeStruct(kt.shape, k.dtype), jax.ShapeDtypeStruct(vt.shape, v.dtype)],
    [pltpu.VMEM((block_k, head_dim), jnp.float32), pltpu.VMEM((block_k, head_dim), jnp.float32)],
    interpret,
    "polylm_flash_dkv_tpu",
  )(*ranges, qt, kt, vt, qseg, kseg, dot_, lse, delta)
  back = lambda x: jnp.swapaxes(x, 1, 2)
  return back(dq), back(dk), back(dv)


def _check_lanes(q, blocks: BlockSizes, block_k: int, interpret: bool) -> None:
  for name, b in (
    ("block_k", block_k),
    ("bwd_block_k", blocks.backward().for_length(q.shape[1])[1]),
  ):
    if not interpret and b % LANES:
      raise ValueError(
        f"pallas_tpu: {name}={b} must be a multiple of {LANES} on TPU "
        f"(segment-id lanes); use a sequence of at least {LANES} tokens"
      )


# [B, T, H, D] attention on a TPU (Mosaic lowering); see common.entry_point.
flash_attention = entry_point("pallas_tpu", _forward, _backward, _check_lanes)
