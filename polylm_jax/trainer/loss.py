"""The training loss: per-token negative log-likelihood of the tied LM head, three ways.

- `full`: logits [B, T, vocab] in float32 at once (fastest while they fit);
- `chunked`: the same over sequence chunks of `chunk` tokens, each chunk's logits rematerialised
  in the backward pass;
- `tiled`: never materialises logits nor their gradient beyond one [token_tile, vocab_tile]
  tile. The forward pass keeps only each token's logsumexp (an online max/sum over vocabulary
  tiles) and target logit; the backward pass recomputes each tile's logits and accumulates the
  hidden-state and embedding gradients tile by tile (a custom VJP). With PolyLM's 256K
  vocabulary the float32 logits, their softmax and gradient are otherwise the largest buffers of
  the step (several GB per device at batch 8 x 2048).

All three give the same values and gradients up to float32 rounding (tests/test_train_step.py).
Where the mesh splits the table over vocabulary, `tiled` runs vocabulary-parallel (below).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from polylm_jax import sharding
from polylm_jax.typecheck import check_fields

LOSS_IMPLS = ("full", "chunked", "tiled")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """gin `TrainerConfig.loss = @LossConfig()`: how the LM-head loss is computed (not what)."""

  impl: str = "full"  # full | chunked | tiled
  chunk: int = 256  # chunked: sequence positions per chunk
  token_tile: int = 1024  # tiled: tokens (batch x sequence, flattened) per tile
  vocab_tile: int = 4096  # tiled: vocabulary rows per tile (a divisor of the vocabulary near it)

  def __post_init__(self):
    check_fields(self)
    if self.impl not in LOSS_IMPLS:
      raise ValueError(f"LossConfig.impl={self.impl!r}: expected one of {LOSS_IMPLS}")
    for name in ("chunk", "token_tile", "vocab_tile"):
      if getattr(self, name) < 1:
        raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be >= 1")


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood, float32."""
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  return logz - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def per_token_nll(model, batch, config: LossConfig) -> jax.Array:
  """NLL [B, T] of batch["targets"] under `model` (an NNX PolyLM) by `config.impl`."""
  tokens, targets = batch["inputs"], batch["targets"]
  positions, segment_ids = batch["positions"], batch["segment_ids"]
  b, t = tokens.shape
  if config.impl == "full" or (config.impl == "chunked" and config.chunk >= t):
    return token_nll(model(tokens, positions, segment_ids), targets)
  x = model.hidden(tokens, positions, segment_ids)
  if config.impl == "chunked":
    return _chunked(model, x, targets, config.chunk)
  args = (
    x.reshape(b * t, -1),
    model.wte[...],
    targets.reshape(b * t),
    config.token_tile,
    config.vocab_tile,
    model.config.compute_dtype,
  )
  active = sharding.active_mesh()
  if active is not None:
    mesh, rules = active
    split, axes = sharding.parts("vocab", mesh, rules)
    if split > 1:  # the table is split over vocabulary: each shard computes its own part
      return vocab_parallel_token_nll(*args, mesh=mesh, rules=rules, axes=axes).reshape(b, t)
  return tiled_token_nll(*args).reshape(b, t)


def _chunked(model, x, targets, chunk: int) -> jax.Array:
  b, t, d = x.shape
  if t % chunk:
    raise ValueError(f"LossConfig.chunk={chunk} does not divide the sequence length {t}")
  xs = x.reshape(b, t // chunk, chunk, d).swapaxes(0, 1)
  ys = targets.reshape(b, t // chunk, chunk).swapaxes(0, 1)
  one = jax.checkpoint(lambda args: token_nll(model.logits(args[0]), args[1]))
  return jax.lax.map(one, (xs, ys)).swapaxes(0, 1).reshape(b, t)


# --- tiled --------------------------------------------------------------------------------------


def _tiles(n: int, tile: int) -> tuple[int, int]:
  """(tile, count) covering n: a divisor of n between tile/2 and tile when there is one (no
  padding, so no padded copy of the embedding table), else `tile` with the last one padded."""
  tile = min(tile, n)
  for size in range(tile, (tile + 1) // 2 - 1, -1):
    if n % size == 0:
      return size, n // size
  return tile, -(-n // tile)


def _varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  manual = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; `vma` before
  return manual.varying if manual is not None else getattr(aval, "vma", frozenset())


def _varying_like(init, *refs):
  """Scan carries that start as constants, typed as varying over the manual mesh axes the refs
  vary over (inside shard_map, vocab_parallel_token_nll; no-op elsewhere): a carry's type must
  not change across iterations."""
  axes = tuple(sorted(set().union(*(_varying_axes(r) for r in refs))))
  if not axes:
    return init
  return jax.tree.map(lambda x: jax.lax.pcast(x, axes, to="varying"), init)


def _tile_logits(h, table_tile, dtype):
  return jnp.einsum(
    "nd,vd->nv", h.astype(dtype), table_tile.astype(dtype), preferred_element_type=jnp.float32
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def tiled_token_nll(hidden, table, targets, token_tile: int, vocab_tile: int, dtype):
  """NLL [N] of targets [N] under logits = hidden [N, D] @ table [V, D]^T, tile by tile."""
  return _tiled_forward(hidden, table, targets, token_tile, vocab_tile, dtype)[0]


def _padded(hidden, table, targets, token_tile, vocab_tile):
  n, v = hidden.shape[0], table.shape[0]
  tt, nt = _tiles(n, token_tile)
  vt, nv = _tiles(v, vocab_tile)
  if nt * tt != n:
    hidden = jnp.pad(hidden, ((0, nt * tt - n), (0, 0)))
    targets = jnp.pad(targets, (0, nt * tt - n))
  if nv * vt != v:
    table = jnp.pad(table, ((0, nv * vt - v), (0, 0)))
  return hidden, table, targets, (n, v, tt, nt, vt, nv)


def _tiled_forward(hidden, table, targets, token_tile, vocab_tile, dtype):
  h, w, y, (n, v, tt, nt, vt, nv) = _padded(hidden, table, targets, token_tile, vocab_tile)

  def token_block(args):
    h_t, y_t = args  # [tt, D], [tt]

    def vocab_step(carry, j):
      m, s, target = carry
      logits = _tile_logits(h_t, jax.lax.dynamic_slice_in_dim(w, j * vt, vt), dtype)
      cols = j * vt + jnp.arange(vt)
      logits = jnp.where(cols[None, :] < v, logits, -jnp.inf)  # padded vocabulary rows
      m_new = jnp.maximum(m, logits.max(axis=-1))
      s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(axis=-1)
      target = target + jnp.where(cols[None, :] == y_t[:, None], logits, 0.0).sum(axis=-1)
      return (m_new, s, target), None

    init = _varying_like((jnp.full((tt,), -jnp.inf), jnp.zeros((tt,)), jnp.zeros((tt,))), h_t, w)
    (m, s, target), _ = jax.lax.scan(vocab_step, init, jnp.arange(nv))
    return m + jnp.log(s), target

  lse, target = jax.lax.map(token_block, (h.reshape(nt, tt, -1), y.reshape(nt, tt)))
  lse, target = lse.reshape(-1)[:n], target.reshape(-1)[:n]
  return lse - target, lse


def _tiled_fwd(hidden, table, targets, token_tile, vocab_tile, dtype):
  nll, lse = _tiled_forward(hidden, table, targets, token_tile, vocab_tile, dtype)
  return nll, (hidden, table, targets, lse)


def _tiled_bwd(token_tile, vocab_tile, dtype, residuals, g):
  hidden, table, targets, lse = residuals
  h, w, y, (n, v, tt, nt, vt, nv) = _padded(hidden, table, targets, token_tile, vocab_tile)
  lse = jnp.pad(lse, (0, nt * tt - n))
  g = jnp.pad(g.astype(jnp.float32), (0, nt * tt - n))  # padded tokens: no gradient
  hs, ys = h.reshape(nt, tt, -1), y.reshape(nt, tt)
  lses, gs = lse.reshape(nt, tt), g.reshape(nt, tt)

  def vocab_tile_grads(dh, j):
    w_j = jax.lax.dynamic_slice_in_dim(w, j * vt, vt)
    cols = j * vt + jnp.arange(vt)

    def token_step(dw_j, i):
      h_t, y_t, lse_t, g_t = hs[i], ys[i], lses[i], gs[i]
      logits = _tile_logits(h_t, w_j, dtype)
      p = jnp.where(cols[None, :] < v, jnp.exp(logits - lse_t[:, None]), 0.0)
      dlogits = (p - (cols[None, :] == y_t[:, None])) * g_t[:, None]  # d nll / d logits
      dh_t = jnp.einsum(
        "nv,vd->nd", dlogits.astype(dtype), w_j.astype(dtype), preferred_element_type=jnp.float32
      )
      dw_j = dw_j + jnp.einsum(
        "nv,nd->vd", dlogits.astype(dtype), h_t.astype(dtype), preferred_element_type=jnp.float32
      )
      return dw_j, dh_t

    dw_init = _varying_like(jnp.zeros((vt, w.shape[1])), h, w)
    dw_j, dh_tiles = jax.lax.scan(token_step, dw_init, jnp.arange(nt))
    return dh + dh_tiles, dw_j

  dh_init = _varying_like(jnp.zeros((nt, tt, w.shape[1])), h, w)
  dh, dw = jax.lax.scan(vocab_tile_grads, dh_init, jnp.arange(nv))
  dh = dh.reshape(nt * tt, -1)[:n].astype(hidden.dtype)
  dw = dw.reshape(nv * vt, -1)[:v].astype(table.dtype)
  return dh, dw, None


tiled_token_nll.defvjp(_tiled_fwd, _tiled_bwd)


# --- tiled, vocabulary-parallel -----------------------------------------------------------------
# Where the rules split the table over vocabulary (`vocab` -> `tensor`), each device keeps its own
# [V / n, D] rows: the tiles above run over the local rows only, the per-token logsumexp and
# target logit are combined across the shards (pmax / psum of [tokens] floats), and in the
# backward pass the hidden-state gradient is summed across them while each shard's table
# gradient stays local. Nothing of size [V, D] crosses the vocabulary axis.


def vocab_parallel_token_nll(
  hidden, table, targets, token_tile: int, vocab_tile: int, dtype, *, mesh, rules, axes
):
  """tiled_token_nll with the table split over `axes` of `mesh` (shard_map over all axes)."""
  batch_spec = sharding.logical_to_mesh_spec((sharding.BATCH,), rules)[0]
  _, batch_axes = sharding.parts(sharding.BATCH, mesh, rules)
  vocab = axes if len(axes) > 1 else axes[0]
  return jax.shard_map(
    lambda h, w, y: _sharded(h, w, y, token_tile, vocab_tile, dtype, vocab, batch_axes),
    mesh=mesh,
    in_specs=(P(batch_spec, None), P(vocab, None), P(batch_spec)),
    out_specs=P(batch_spec),
    check_vma=True,
  )(hidden, table, targets)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def _sharded(hidden, table, targets, token_tile, vocab_tile, dtype, vocab, batch_axes):
  return _sharded_fwd(hidden, table, targets, token_tile, vocab_tile, dtype, vocab, batch_axes)[0]


def _local_targets(targets, table, vocab):
  """Targets as row indices of this shard's table (out of [0, V/n) where another shard has them:
  those match no column here and add nothing)."""
  return targets - jax.lax.axis_index(vocab) * table.shape[0]


def _sharded_fwd(hidden, table, targets, token_tile, vocab_tile, dtype, vocab, batch_axes):
  local = _local_targets(targets, table, vocab)
  nll_local, lse_local = _tiled_forward(hidden, table, local, token_tile, vocab_tile, dtype)
  target = jax.lax.psum(lse_local - nll_local, vocab)  # the target logit, from its one shard
  m = jax.lax.pmax(lse_local, vocab)
  lse = m + jnp.log(jax.lax.psum(jnp.exp(lse_local - m), vocab))
  return lse - target, (hidden, table, targets, lse)


def _sharded_bwd(token_tile, vocab_tile, dtype, vocab, batch_axes, residuals, g):
  hidden, table, targets, lse = residuals
  local = _local_targets(targets, table, vocab)
  dh, dw, _ = _tiled_bwd(token_tile, vocab_tile, dtype, (hidden, table, local, lse), g)
  dh = jax.lax.psum(dh, vocab)  # every shard's rows contribute to each token's hidden state
  if batch_axes:  # this shard's table rows saw only this device's tokens
    dw = jax.lax.psum(dw, batch_axes)
  return dh, dw, None


_sharded.defvjp(_sharded_fwd, _sharded_bwd)
