"""What the Pallas attention kernels share: block sizes, input checks, the reference they are
tested against, and the math of one key block (masking, online softmax)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

# Finite "minus infinity": exp(MASK - m) underflows to 0 without producing NaN from inf - inf.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
HEAD_DIMS = (16, 32, 64, 128, 256)  # powers of two: Triton block shapes; PolyLM uses 128


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Query / key block lengths of the forward kernel and (bwd_*; None = as forward) of both backward
  kernels, which favour smaller blocks on GPUs (bench/gpu_check.py's sweep). Clamped to the
  length."""

  block_q: int = 128
  block_k: int = 128
  bwd_block_q: int | None = None
  bwd_block_k: int | None = None

  def for_length(self, length: int) -> tuple[int, int]:
    return min(self.block_q, length), min(self.block_k, length)

  def backward(self) -> "BlockSizes":
    return BlockSizes(self.bwd_block_q or self.block_q, self.bwd_block_k or self.block_k)


def check_inputs(q, k, v, segment_ids, blocks: BlockSizes, *, impl: str) -> tuple[int, int]:
  """Raises with what to change when the kernel cannot take these inputs; returns the block
  sizes."""
  if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
    raise ValueError(
      f"{impl}: q, k, v must be [batch, length, heads, head_dim] of one shape; got "
      f"{q.shape}, {k.shape}, {v.shape}"
    )
  if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(
      f"{impl}: q, k, v must all be float32 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}"
    )
  _, length, _, head_dim = q.shape
  if head_dim not in HEAD_DIMS:
    raise ValueError(
      f"{impl}: head_dim {head_dim} is not supported; use one of {HEAD_DIMS} "
      f"(d_model / num_heads), or attention_impl='xla'"
    )
  block_q, block_k = blocks.for_length(length)
  bwd_q, bwd_k = blocks.backward().for_length(length)
  for name, b in (
    ("block_q", block_q),
    ("block_k", block_k),
    ("bwd_block_q", bwd_q),
    ("bwd_block_k", bwd_k),
  ):
    if b < 16 or b & (b - 1):
      raise ValueError(
        f"{impl}: {name}={b} must be a power of two >= 16 (sequence length "
        f"{length}); pad the sequence or change BlockSizes"
      )
    if length % b:
      raise ValueError(
        f"{impl}: sequence length {length} is not a multiple of {name}={b}; pad the "
        f"sequence to a multiple of {b} or choose a smaller {name}"
      )
  if segment_ids is not None and segment_ids.shape != q.shape[:2]:
    raise ValueError(
      f"{impl}: segment_ids must be [batch, length] = {q.shape[:2]}, got {segment_ids.shape}"
    )
  return block_q, block_k


def block_mask(q_pos, k_pos, q_seg, k_seg, causal: bool):
  """[block_q, block_k] bool: same segment and (if causal) key not after query."""
  mask = q_seg[:, None] == k_seg[None, :]
  if causal:
    mask = mask & (q_pos[:, None] >= k_pos[None, :])
  return mask


def online_softmax_step(s, v, m, denom, acc):
  """One key block of flash attention (FlashAttention-2 algorithm 1), all statistics float32.

  s: [bq, bk] masked scores; v: [bk, d]; m, denom: [bq] running max and sum; acc: [bq, d]."""
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  correction = jnp.exp(m - m_new)
  p = jnp.exp(s - m_new[:, None])
  denom_new = correction * denom + jnp.sum(p, axis=1)
  pv = jax.lax.dot_general(
    p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
  )
  return m_new, denom_new, correction[:, None] * acc + pv


def dot_t(a, b):
  """a @ b.T with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a.T @ b with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def segment_ids_or_one(q, segment_ids) -> jax.Array:
  """int32 segment ids; None means every row is one document."""
  if segment_ids is None:
    return jnp.ones(q.shape[:2], jnp.int32)
  return segment_ids.astype(jnp.int32)


def differentiable(forward, backward):
  """Ties a kernel pair into f(q, k, v, seg, causal, blocks, interpret) with a custom VJP.

  forward(q, k, v, seg, causal, blocks, interpret) -> (o, lse);
  backward(q, k, v, seg, o, lse, do, causal, blocks, interpret) -> (dq, dk, dv).
  Only q, k, v, the output and the log-sum-exp are kept for backward (no [T, T] residuals)."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
  def flash(q, k, v, seg, causal, blocks, interpret):
    return forward(q, k, v, seg, causal, blocks, interpret)[0]

  def flash_fwd(q, k, v, seg, causal, blocks, interpret):
    o, lse = forward(q, k, v, seg, causal, blocks, interpret)
    return o, (q, k, v, seg, o, lse)

  def flash_bwd(causal, blocks, interpret, residuals, do):
    q, k, v, seg, o, lse = residuals
    return (*backward(q, k, v, seg, o, lse, do, causal, blocks, interpret), None)

  flash.defvjp(flash_fwd, flash_bwd)
  return flash


def entry_point(impl: str, forward, backward, check=None):
  """A kernel pair's public function, the same for every platform:
  flash_attention(q, k, v, segment_ids=None, *, causal=True, blocks=BlockSizes(), interpret=False).
  `check(q, blocks, block_k, interpret)` adds the platform's own input checks."""
  flash = differentiable(forward, backward)

  def flash_attention(
    q,
    k,
    v,
    segment_ids=None,
    *,
    causal: bool = True,
    blocks: BlockSizes = BlockSizes(),
    interpret: bool = False,
  ) -> jax.Array:
    """[B, T, H, D] attention with packing (segment ids) and causal masking. `interpret=True`
    runs the same kernels in the Pallas interpreter (any platform; for tests)."""
    _, block_k = check_inputs(q, k, v, segment_ids, blocks, impl=impl)
    if check is not None:
      check(q, blocks, block_k, interpret)
    return flash(q, k, v, segment_ids_or_one(q, segment_ids), causal, blocks, interpret)

  flash_attention.__qualname__ = flash_attention.__name__ = "flash_attention"
  return flash_attention
