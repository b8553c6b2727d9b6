"""The train step: loss, gradients (optionally over microbatches), a guarded AdamW update, as one
`jax.jit` with explicit in/out shardings over the (data, fsdp, tensor) mesh.

Imports only jax/flax/optax: it runs on hosts without seqio/tensorflow/gin (e.g. a GPU benchmark).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from polylm_jax import languages, sharding
from polylm_jax.config import ModelConfig
from polylm_jax.kernels.common import BlockSizes
from polylm_jax.model import params as model_params
from polylm_jax.optimizer import (
  OptimizerConfig,
  global_norm,
  lr_schedule,
  make_optimizer,
  scale_by_lr,
)
from polylm_jax.trainer import spikes
from polylm_jax.trainer.loss import LossConfig, per_token_nll

# The batch the step consumes: packed rows with per-document positions and segment ids.
BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")
BATCH_LOGICAL = sharding.ROWS


@struct.dataclass
class TrainState:
  step: jax.Array  # batches consumed (a skipped update still consumes its batch)
  params: Any
  opt_state: Any
  nonfinite_in_a_row: jax.Array
  nonfinite_total: jax.Array
  spike_stats: jax.Array  # running loss / grad-norm statistics (trainer/spikes.py)


# Optional batch key "languages": per token 0 (none/padding) or the language's tag in the run's
# language set (languages.py), carried through packing; the step then reports loss per language.


def batch_fingerprint(batch) -> jax.Array:
  """A uint32 hash of the global batch's token ids, loss weights and segments, position by
  position: equal for equal batches however they are sharded (wrapping integer sums are exact
  in any order), different when any token or row moves. Logged per step (metrics.jsonl) to check
  that a restart, or a resume on another number of processes, trains on the same rows."""
  x = batch["inputs"].astype(jnp.uint32)
  rows, length = x.shape
  pos = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) * jnp.uint32(length)
  pos = pos + jax.lax.broadcasted_iota(jnp.uint32, x.shape, 1)
  v = x * jnp.uint32(0x9E3779B1) + pos * jnp.uint32(0x85EBCA77)
  v = v + batch["segment_ids"].astype(jnp.uint32) * jnp.uint32(0xC2B2AE3D)
  v = v + (batch["weights"] > 0).astype(jnp.uint32) * jnp.uint32(0x27D4EB2F)
  v = v ^ (v >> 15)
  v = v * jnp.uint32(0x2C1B3C6D)
  v = v ^ (v >> 12)
  return jnp.sum(v, dtype=jnp.uint32)


def _all_finite(state: TrainState) -> jax.Array:
  leaves = [
    x
    for x in jax.tree.leaves((state.params, state.opt_state))
    if jnp.issubdtype(x.dtype, jnp.floating)
  ]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _signature(batch) -> tuple:
  return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()))


@dataclasses.dataclass
class TrainStep:
  """Everything needed to initialise and run sharded training for one model/optimizer/mesh."""

  model_config: ModelConfig
  optimizer_config: OptimizerConfig
  mesh: Mesh
  rules: tuple
  total_steps: int
  spike_config: spikes.SpikeConfig = spikes.SpikeConfig()
  language_slots: int = languages.DEFAULT.slots  # the run's Languages.slots (loss per language)
  loss_config: LossConfig = LossConfig()
  attention_blocks: BlockSizes = BlockSizes()  # the Pallas kernels' tiling (kernels/common.py)

  def __post_init__(self):
    self._compiled: Any = None
    self._compiled_for: Any = None
    sharding.check_model_fits_mesh(self.model_config, self.mesh, self.rules)
    self.graphdef = model_params.graphdef(self.model_config, self.attention_blocks)
    abstract = model_params.abstract_params(self.model_config)
    self.tx = make_optimizer(self.optimizer_config, abstract)
    self.schedule = lr_schedule(self.optimizer_config, self.total_steps)
    self.param_shardings = sharding.tree_shardings(
      model_params.logical_axes(self.model_config), abstract, self.mesh, self.rules, prefix="params"
    )
    replicated = NamedSharding(self.mesh, P())
    abstract_opt = jax.eval_shape(self.tx.init, abstract)
    # Optimizer moments mirror the parameters and are sharded like them; counters are replicated.
    opt_shardings = optax.tree_map_params(
      self.tx,
      lambda _, s: s,
      abstract_opt,
      self.param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct),
    )
    self.state_shardings = TrainState(  # (the same structure, holding shardings)
      step=replicated,  # type: ignore[arg-type]
      params=self.param_shardings,
      opt_state=opt_shardings,
      nonfinite_in_a_row=replicated,  # type: ignore[arg-type]
      nonfinite_total=replicated,  # type: ignore[arg-type]
      spike_stats=replicated,  # type: ignore[arg-type]
    )
    self.batch_sharding = NamedSharding(
      self.mesh, sharding.logical_to_mesh_spec(BATCH_LOGICAL, self.rules)
    )
    self._init = jax.jit(self.initial_state, static_argnums=0, out_shardings=self.state_shardings)
    self._step = jax.jit(
      self._train_step,
      in_shardings=(self.state_shardings, self.batch_sharding),
      out_shardings=(self.state_shardings, replicated),
      donate_argnums=0,
    )
    self._eval = jax.jit(
      self._eval_sums,
      in_shardings=(self.param_shardings, self.batch_sharding),
      out_shardings=(replicated, replicated),
    )
    self._finite = jax.jit(
      _all_finite, in_shardings=(self.state_shardings,), out_shardings=replicated
    )

  def check_batch_shape(self, batch_size: int) -> None:
    parts = sharding.batch_parts(self.mesh, self.rules)
    accum = self.optimizer_config.grad_accum_steps
    if batch_size % (parts * accum):
      raise ValueError(
        f"global batch size {batch_size} must be divisible by the {parts} ways the mesh splits "
        f"the batch (rule {sharding.BATCH!r}) times OptimizerConfig.grad_accum_steps ({accum})"
      )

  # --- init ---------------------------------------------------------------------------------
  def initial_state(self, seed: int) -> TrainState:
    """Fresh state (traceable; jax.eval_shape of it gives the state's abstract shapes)."""
    return self._state_at_step_0(model_params.init_params(self.model_config, seed))

  def _state_at_step_0(self, params) -> TrainState:
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
      step=zero,
      params=params,
      opt_state=self.tx.init(params),
      nonfinite_in_a_row=zero,
      nonfinite_total=zero,
      spike_stats=spikes.initial_stats(),
    )

  def init(self, seed: int) -> TrainState:
    with self.mesh, sharding.activate(self.mesh, self.rules):
      return self._init(seed)

  def init_from_params(self, params) -> TrainState:
    """Step 0 with given (already placed) parameters and a fresh optimizer state."""
    with self.mesh, sharding.activate(self.mesh, self.rules):
      return jax.jit(
        self._state_at_step_0,
        in_shardings=(self.param_shardings,),
        out_shardings=self.state_shardings,
      )(params)

  # --- step ---------------------------------------------------------------------------------
  def _loss_sums(self, params, batch):
    """(summed NLL, aux): aux holds the token count and, given "languages", per-language sums."""
    nll = per_token_nll(model_params.model(self.graphdef, params), batch, self.loss_config)
    w = batch["weights"].astype(jnp.float32)
    aux = {"weight": jnp.sum(w)}
    if "languages" in batch:
      onehot = (
        jax.nn.one_hot(batch["languages"], self.language_slots, dtype=jnp.float32) * w[..., None]
      )
      aux["language_loss"] = jnp.einsum("btl,bt->l", onehot, nll)
      aux["language_tokens"] = jnp.sum(onehot, axis=(0, 1))
    return jnp.sum(nll * w), aux

  def loss_and_grads(self, params, batch):
    """Gradient of the token-mean loss over the whole batch, summed microbatch by microbatch."""
    grad_fn = jax.value_and_grad(self._loss_sums, has_aux=True)
    accum = self.optimizer_config.grad_accum_steps
    if accum == 1:
      (loss_sum, aux), grads = grad_fn(params, batch)
    else:
      # Microbatch m takes rows m, m+accum, ...: every microbatch stays spread over all devices.
      def split(x):
        x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None,) + BATCH_LOGICAL)

      micro = jax.tree.map(split, batch)

      def body(carry, mb):
        (loss_sum, a), g = grad_fn(params, mb)
        return jax.tree.map(jnp.add, carry, (loss_sum, a, g)), None

      zero_aux = jax.tree.map(
        jnp.zeros_like,
        jax.eval_shape(lambda: self._loss_sums(params, jax.tree.map(lambda x: x[0], micro))[1]),
      )
      init = (jnp.zeros((), jnp.float32), zero_aux, jax.tree.map(jnp.zeros_like, params))
      (loss_sum, aux, grads), _ = jax.lax.scan(body, init, micro)
    denom = jnp.maximum(aux["weight"], 1.0)
    return loss_sum / denom, jax.tree.map(lambda g: g / denom, grads), aux

  def _train_step(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    loss, grads, aux = self.loss_and_grads(state.params, batch)
    weight = aux["weight"]
    grad_norm = global_norm(grads)
    lr = self.schedule(state.step)
    updates, new_opt = self.tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, scale_by_lr(updates, lr))
    # A non-finite loss or gradient leaves parameters and optimizer state untouched; so does a
    # loss spike when SpikeConfig.mode is skip or rollback.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    spike_stats, spike = state.spike_stats, jnp.zeros((), bool)
    spike_info: dict[str, jax.Array] = {}
    if self.spike_config.mode != "off":
      spike, spike_stats, spike_info = spikes.detect(
        state.spike_stats, loss, grad_norm, finite, self.spike_config
      )
    apply = finite & ~spike if self.spike_config.blocks_update else finite
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)
    bad = (~finite).astype(jnp.int32)
    new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      opt_state=keep(new_opt, state.opt_state),
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
      nonfinite_total=state.nonfinite_total + bad,
      spike_stats=spike_stats,
    )
    metrics = {
      "loss": loss,
      "grad_norm": grad_norm,
      "learning_rate": lr,
      "target_tokens": weight,
      "skipped": (~apply).astype(jnp.int32),
      "nonfinite": bad,
      "nonfinite_in_a_row": new_state.nonfinite_in_a_row,
      "nonfinite_total": new_state.nonfinite_total,
      "spike": spike.astype(jnp.int32),
      "batch_fingerprint": batch_fingerprint(batch),
      **spike_info,
      **{k: v for k, v in aux.items() if k.startswith("language_")},
    }
    return new_state, metrics

  def __call__(self, state: TrainState, batch) -> tuple[TrainState, dict]:
    if self.compiled_for(batch):
      return self._compiled(state, batch)
    with self.mesh, sharding.activate(self.mesh, self.rules):
      return self._step(state, batch)

  def compiled_for(self, batch) -> bool:
    """Whether compile_for has compiled the step for batches of this one's shapes and dtypes."""
    return self._compiled is not None and self._compiled_for == _signature(batch)

  def compile_for(self, state, batch):
    """Compiles the step for this state and (placed) batch now, keeps the executable for the
    steps that follow, and returns XLA's memory and cost analysis of it (memory_report.py)."""
    from polylm_jax.trainer import memory_report

    self._compiled = self.lower(state, batch).compile()
    self._compiled_for = _signature(batch)
    return memory_report.analyse(self._compiled)

  def lower(self, state, batch):
    """The step lowered for these (possibly abstract: jax.ShapeDtypeStruct) state and batch;
    `.compile()` gives the executable and its memory and cost analysis, for any target devices
    the mesh was built from (e.g. a TPU topology on a CPU host)."""
    with self.mesh, sharding.activate(self.mesh, self.rules):
      return self._step.lower(state, batch)

  def abstract_state(self, seed: int = 0) -> TrainState:
    """The train state's shapes, dtypes and shardings; nothing is allocated."""
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(lambda: self.initial_state(seed)),
      self.state_shardings,
    )

  def abstract_batch(self, batch_size: int, seq_len: int, *, languages: bool = True) -> dict:
    keys = BATCH_KEYS + (("languages",) if languages else ())
    return {
      k: jax.ShapeDtypeStruct(
        (batch_size, seq_len),
        jnp.float32 if k == "weights" else jnp.int32,
        sharding=self.batch_sharding,
      )
      for k in keys
    }

  def _eval_sums(self, params, batch):
    loss_sum, aux = self._loss_sums(params, batch)
    return loss_sum, aux["weight"]

  def eval_sums(self, params, batch) -> tuple[jax.Array, jax.Array]:
    """Summed held-out NLL and the number of target tokens of one placed batch."""
    with self.mesh, sharding.activate(self.mesh, self.rules):
      return self._eval(params, batch)

  def is_finite(self, state: TrainState) -> bool:
    """Whether every parameter and optimizer-state value is finite (one reduction on device)."""
    with self.mesh, sharding.activate(self.mesh, self.rules):
      return bool(self._finite(state))

  def place_batch(self, local_batch: dict) -> dict:
    """Global jax.Arrays from this process's rows (identical to device_put on one host)."""
    missing = [k for k in BATCH_KEYS if k not in local_batch]
    if missing:
      raise KeyError(f"batch is missing {missing}; a batch needs {BATCH_KEYS}")
    keys = BATCH_KEYS + (("languages",) if "languages" in local_batch else ())
    return {
      k: jax.make_array_from_process_local_data(self.batch_sharding, local_batch[k]) for k in keys
    }
