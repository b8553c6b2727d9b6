"""Log-likelihoods of token sequences, batched and bucketed, on the mesh.

Requests are sorted by length, grouped into batches, and each batch is right-padded to a length
bucket (`length_bucket`: 32, 48, 64, 80, 96, 112, 128, 160, ...), so a benchmark compiles a
handful of programs. The LM head runs only at the scored positions (the
last `window` of each row, a bucket of the batch's longest continuation): a multiple-choice
continuation is a few tokens, and the vocabulary projection is a large share of the model's work
(half of it for `small`). Only per-token log-probabilities and greedy flags come back to the host.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from polylm_jax import framing, sharding
from polylm_jax.config import ModelConfig
from polylm_jax.decode import sampling
from polylm_jax.model import params as model_params

MIN_BUCKET = 32


def length_bucket(n: int, limit: int, smallest: int = MIN_BUCKET) -> int:
  """The smallest bucket that holds n (capped at limit): from `smallest` up in steps of a quarter
  to an eighth of the current power of two (32, 48, 64, 80, 96, 112, 128, 160, ...), so at most
  about a fifth of a batch is padding and a benchmark's lengths fall into a few buckets."""
  size = smallest
  while size < n:
    size += max(smallest // 2, 1 << max(size.bit_length() - 3, 0))
  return min(limit, size)


@dataclasses.dataclass
class Scored:
  logprob: float  # sum of log p(target) over the scored tokens
  greedy: bool  # every scored token is the argmax


class Scorer:
  """score([(inputs, targets, first_scored)]) for one model on one mesh.

  Each item: `inputs` the token ids fed to the model, `targets` the ids it should predict at each
  input position (same length), and the index of the first position whose target counts (earlier
  positions are context).

  `head_t`: the LM head as a [d_model, vocab] copy of the embedding, where the caller keeps one
  (the generator's `unrolled` layout, whose per-layer parameters it may share)."""

  def __init__(
    self,
    config: ModelConfig,
    params,
    *,
    mesh: Mesh,
    rules=sharding.DEFAULT_RULES,
    batch_size: int = 16,
    head_t: jax.Array | None = None,
  ):
    self.config, self.params, self.mesh, self.rules = config, params, mesh, tuple(rules)
    self.head_t = head_t
    self.graphdef = model_params.graphdef(config)
    parts = sharding.batch_parts(mesh, self.rules)
    self.batch_size = -(-batch_size // parts) * parts
    self.rows = NamedSharding(mesh, sharding.logical_to_mesh_spec(sharding.ROWS, self.rules))
    self._fns: dict = {}
    self.compiled_shapes: set[tuple[int, int, int]] = set()  # (batch, length, window)

  def _fn(self, batch: int, length: int, window: int):
    key = (batch, length, window)
    if key not in self._fns:

      def token_scores(weights, inputs, targets, segments, ends):
        params, head_t = weights
        model = model_params.model(self.graphdef, params)
        hidden = model.hidden(inputs, None, segments)
        # The last `window` positions of each row (ending at its last real token).
        at = jnp.clip(ends[:, None] - window + jnp.arange(window)[None, :], 0, length - 1)
        hidden = jnp.take_along_axis(hidden, at[..., None], axis=1)
        targets = jnp.take_along_axis(targets, at, axis=1)
        logits = model.logits(hidden, head_t)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        target_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        rows_first = sampling.first_argmax(logits.reshape(-1, logits.shape[-1]))
        greedy = rows_first.reshape(targets.shape) == targets
        return target_logp, greedy

      replicated = NamedSharding(self.mesh, PartitionSpec())  # every host reads the scores
      per_row = NamedSharding(
        self.mesh, sharding.logical_to_mesh_spec((sharding.BATCH,), self.rules)
      )
      self._fns[key] = jax.jit(
        token_scores,
        in_shardings=(
          jax.tree.map(lambda x: x.sharding, (self.params, self.head_t)),
          self.rows,
          self.rows,
          self.rows,
          per_row,
        ),
        out_shardings=(replicated, replicated),
      )
      self.compiled_shapes.add(key)
    return self._fns[key]

  def score(
    self, items: Sequence[tuple[Sequence[int], Sequence[int], int]], progress=None
  ) -> list[Scored]:
    limit = self.config.max_length
    for i, (inputs, targets, first) in enumerate(items):
      if len(inputs) != len(targets) or not 0 <= first < len(inputs) or len(inputs) > limit:
        raise ValueError(
          f"scoring request {i}: {len(inputs)} inputs, {len(targets)} targets, "
          f"first scored {first}, context {limit}"
        )
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    out: list[Scored | None] = [None] * len(items)
    with self.mesh, sharding.activate(self.mesh, self.rules):
      for begin in range(0, len(order), self.batch_size):
        chunk = order[begin : begin + self.batch_size]
        length = length_bucket(len(items[chunk[0]][0]), limit)
        scored = max(len(items[i][0]) - items[i][2] for i in chunk)
        window = length_bucket(scored, length, smallest=8)
        rows = np.full((self.batch_size, length), framing.PAD_ID, np.int32)
        goals = np.zeros_like(rows)
        segments = np.zeros_like(rows)
        ends = np.zeros(self.batch_size, np.int32)
        for row, i in enumerate(chunk):
          n = len(items[i][0])
          rows[row, :n], goals[row, :n], segments[row, :n] = items[i][0], items[i][1], 1
          ends[row] = n
        placed = [sharding.global_array(a, self.rows) for a in (rows, goals, segments)]
        placed.append(
          sharding.global_array(
            ends,
            NamedSharding(self.mesh, sharding.logical_to_mesh_spec((sharding.BATCH,), self.rules)),
          )
        )
        logp, greedy = jax.device_get(
          self._fn(self.batch_size, length, window)((self.params, self.head_t), *placed)
        )
        for row, i in enumerate(chunk):
          n, first = len(items[i][0]), items[i][2]
          lo = window - (n - first)  # the scored positions are the row's last n - first
          out[i] = Scored(
            float(np.sum(logp[row, lo:], dtype=np.float64)), bool(np.all(greedy[row, lo:]))
          )
        if progress is not None:
          progress.update(len(chunk))
    return out  # type: ignore[return-value]
