"""The training loop: a Trainer assembles mesh, step, checkpointer and metrics writer once, then
feeds batches; everything else (preemption, spike rollback, evaluation, profiling) plugs in as
callbacks (callbacks.py) that the training command hands over.

Takes any iterator of numpy batches; checkpointing needs one that can save and restore its state
(`polylm_jax.data.resumable.BatchIterator`). Imports no seqio/tensorflow/gin itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from polylm_jax import framing, languages, sharding
from polylm_jax.background import Background
from polylm_jax.checkpoint.manager import (
  CheckpointConfig,
  Checkpointer,
  load_initial_params,
  set_aside_previous_run,
)
from polylm_jax.config import ModelConfig, analytic_param_count
from polylm_jax.errors import CheckpointSaveError
from polylm_jax.io import locks, storage
from polylm_jax.kernels.common import BlockSizes
from polylm_jax.optimizer import OptimizerConfig
from polylm_jax.trainer import flops, reporting
from polylm_jax.trainer.callbacks import Callback, default_callbacks
from polylm_jax.trainer.loss import LossConfig
from polylm_jax.trainer.metrics import MetricsWriter
from polylm_jax.trainer.spikes import SpikeConfig
from polylm_jax.trainer.step import TrainStep
from polylm_jax.typecheck import check_fields


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  # None: set by the entry point from `train.epochs` (instruction tuning, gin_configs/sft/).
  num_steps: int | None = 100
  seed: int = 0  # parameter init
  log_every: int = 10  # console / TensorBoard cadence (metrics.jsonl gets every step)
  max_nonfinite_in_a_row: int = 5  # K: stop after K consecutive skipped (non-finite) updates
  peak_flops_per_device: float | None = None  # None: look the device up in flops.PEAK_FLOPS_...
  tensorboard: bool = True
  progress_bar: bool | None = None  # None: only when stderr is a terminal
  # Start (when the workdir has no checkpoint) from parameters written by polylm-import.
  init_params_from: str | None = None
  eval_every: int = 0  # held-out loss per language every N steps and at the end (0: never)
  # When the newest checkpoint's optimizer settings differ from these (e.g. grad_clip_norm turned
  # off), keep its parameters, step and data position and start a fresh optimizer state, instead
  # of refusing to resume. Checkpoints saved after that resume normally.
  reset_optimizer: bool = False
  # When the newest checkpoint was saved with other data settings (DataConfig.mixture, shuffle,
  # seed, batch_size, seq_len, the curriculum stage, ...), keep its parameters, optimizer state
  # and step and start the configured data pipelines afresh, instead of refusing to resume.
  reset_data: bool = False
  # lm-eval tasks (suite families such as 'xcopa', or task names) on the live parameters every
  # lm_eval_every steps and at the end; results next to the held-out loss (eval/in_training.py).
  lm_eval_tasks: tuple[str, ...] = ()
  lm_eval_every: int = 0
  lm_eval_limit: int | None = None  # documents per task
  lm_eval_num_fewshot: int = 0
  lm_eval_include_path: str | None = None  # a directory of your own task YAMLs
  # How the LM-head loss is computed (whole logits, sequence chunks, vocabulary tiles).
  loss: LossConfig = LossConfig()
  # How the Pallas attention kernels tile the sequence (ModelConfig.attention_impl picks the
  # kernel): `TrainerConfig.attention_blocks = @BlockSizes()`, `BlockSizes.block_q = 128`, ...
  attention_blocks: BlockSizes = BlockSizes()
  # A JAX profiler trace of steps profile_start_step .. + profile_num_steps - 1 into
  # <workdir>/profile (0: none).
  profile_start_step: int = 0
  profile_num_steps: int = 3

  def __post_init__(self):
    check_fields(self)
    for name in ("num_steps", "log_every", "max_nonfinite_in_a_row"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"TrainerConfig.{name}={getattr(self, name)} must be >= 1")
    for name in ("eval_every", "lm_eval_every", "profile_start_step"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainerConfig.{name}={getattr(self, name)} must be >= 0 (0: never)")
    if self.profile_num_steps < 1:
      raise ValueError(f"TrainerConfig.profile_num_steps={self.profile_num_steps} must be >= 1")
    if bool(self.lm_eval_tasks) != bool(self.lm_eval_every):
      raise ValueError(
        "TrainerConfig.lm_eval_tasks and lm_eval_every go together: set both "
        f"(got tasks={self.lm_eval_tasks!r}, every={self.lm_eval_every})"
      )


class Trainer:
  """One run's parts, built once: the mesh and step, the checkpointer, the metadata a checkpoint
  records. `run()` takes the workdir's lock, restores or initialises the state and trains up to
  `config.num_steps`; callbacks see the live trainer (`step`, `state`, `step_fn`, `checkpointer`,
  `batches`) at the points callbacks.py lists."""

  def __init__(
    self,
    model: ModelConfig,
    optimizer: OptimizerConfig,
    mesh_config: sharding.MeshConfig,
    config: TrainerConfig,
    batches: Iterator[dict[str, np.ndarray]],
    workdir: str,
    *,
    checkpoint: CheckpointConfig | None = None,
    spikes: SpikeConfig = SpikeConfig(),
    metadata: dict[str, Any] | None = None,
    language_set: languages.Languages = languages.DEFAULT,
    callbacks: Sequence[Callback] | None = None,
  ):
    if config.num_steps is None:
      raise ValueError("TrainerConfig.num_steps is None: set the number of steps to train")
    self.num_steps: int = config.num_steps
    self.model, self.config, self.workdir = model, config, workdir
    self.batches: Any = batches  # resumable ones also save, restore, skip and know their position
    self.language_set = language_set
    self.callbacks = list(default_callbacks(spikes) if callbacks is None else callbacks)
    self.lead = jax.process_index() == 0  # one writer per run, whatever the number of hosts
    self.mesh = sharding.make_mesh(mesh_config)
    self.step_fn = TrainStep(
      model_config=model,
      optimizer_config=optimizer,
      mesh=self.mesh,
      rules=mesh_config.effective_rules,
      total_steps=config.num_steps,
      spike_config=spikes,
      language_slots=language_set.slots,
      loss_config=config.loss,
      attention_blocks=config.attention_blocks,
    )
    logging.info(
      "mesh %s over %d %s device(s); model %s, %.4g parameters",
      dict(self.mesh.shape),
      self.mesh.devices.size,
      jax.devices()[0].platform,
      model.name,
      analytic_param_count(model),
    )
    self.checkpoint_config = checkpoint
    self.checkpointer: Checkpointer | None = None
    self.meta = dict(
      metadata or {},
      model_config=dataclasses.asdict(model),
      seed=config.seed,
      framing=framing.TRAINING.to_meta(),
      languages=list(language_set.codes),
    )
    self.peak = flops.peak_flops_per_device(jax.devices()[0], config.peak_flops_per_device)
    self.state: Any = None
    self.step = self.step_at_start = 0
    self._pending: reporting.Pending | None = None
    self._reported: reporting.Pending | None = None  # the step whose metrics are being read
    self._rolled_back = False

  def run(self, *, start_over: bool = False) -> dict[str, Any]:
    """Trains; returns the last metrics, the final state and the step object. Process 0 holds
    the workdir's lock for the whole run. `start_over` moves an earlier run's files to
    <workdir>/previous/ first; without it a workdir with checkpoints is always resumed."""
    with locks.workdir_lock(self.workdir) if self.lead else contextlib.nullcontext():
      if start_over and self.lead:
        set_aside_previous_run(self.workdir)
      cfg = self.checkpoint_config
      if cfg is not None and cfg.enabled:
        self.checkpointer = Checkpointer(self.workdir, cfg, self.step_fn)
      return self._run()

  def _run(self) -> dict[str, Any]:
    ckpt = self.checkpointer
    if ckpt is not None:
      for attr in ("save", "restore", "position"):
        if not hasattr(self.batches, attr):
          raise TypeError(
            "checkpointing needs a resumable batch iterator (save/restore/position, "
            "e.g. data.resumable.BatchIterator); set CheckpointConfig.enabled=False"
          )
    for callback in self.callbacks:
      callback.check(self)
    # The first batch (tf.data fills its shuffle buffers, opens every file) is fetched in the
    # background while the state is initialised and the step compiled; a resume must restore
    # the data state first.
    first = None if ckpt is not None and ckpt.steps_on_disk() else self._fetch_first()
    try:
      self.state = _initial_state(ckpt, self.step_fn, self.batches, self.config, self.meta)
    except BaseException:
      if first is not None:
        first.wait()
      if ckpt is not None:
        ckpt.manager.close()
      raise
    self.step = self.step_at_start = int(self.state.step)
    if first is None and self.step < self.num_steps:
      first = self._fetch_first()
    writer = MetricsWriter(
      self.workdir,
      tensorboard=self.config.tensorboard,
      total_steps=self.num_steps,
      start_step=self.step,
      progress_bar=self.config.progress_bar,
      enabled=self.lead,
    )
    started: list[Callback] = []
    try:
      for callback in self.callbacks:
        started.append(callback)
        callback.on_start(self)
      last = self._loop(first, writer)
    except BaseException as e:
      if first is not None:  # the first batch's thread, finished or not, ends before the process
        first.wait()
      self._close_after_failure(e, writer, started)
      raise
    for callback in started:
      callback.close()
    writer.close()
    if ckpt is not None:
      ckpt.close()  # a failed final save raises here
    return {"metrics": last, "state": self.state, "train_step": self.step_fn}

  def _loop(self, first: Background | None, writer: MetricsWriter) -> dict[str, Any]:
    last: dict[str, Any] = {}
    clock = time.perf_counter()
    while self.step < self.num_steps:
      local, placed = self._first_batch(first) if first is not None else self._next_batch()
      self.state, metrics = self.step_fn(self.state, placed)
      if first is not None:
        self._record_config()
        first = None
      self.step += 1
      if self._pending is not None:
        last, clock = self._report(writer, clock)
        if self._rolled_back:  # a callback went back to the last checkpoint
          continue
      rows, seq_len = local["inputs"].shape
      position = getattr(self.batches, "position", self.step)
      self._pending = reporting.Pending(
        self.step, metrics, rows * jax.process_count(), seq_len, position
      )
      stop = next((r for c in self.callbacks if (r := c.wants_stop(self, self.step))), None)
      if self.checkpointer is not None and self._save_due(stop):
        # This step's metrics are written before its checkpoint, so a run killed right after the
        # save and resumed from it still has every step's record.
        last, clock = self._report(writer, clock)
        if self._rolled_back:
          continue
        _save_if_sound(
          self.checkpointer, self.step_fn, self.step, self.state, self.batches, self.meta
        )
      for callback in self.callbacks:
        callback.after_step(self, self.step)
      if stop:
        logging.warning(
          "stopped at step %d for %s; the checkpoint is being finalised", self.step, stop
        )
        break
    if self._pending is not None:
      last, _ = self._report(writer, clock)
    return last

  def _fetch_first(self) -> Background:
    batches = self.batches
    return Background(lambda: next(batches), "first-batch")

  def _next_batch(self):
    local = next(self.batches)
    return local, self.step_fn.place_batch(local)

  def _first_batch(self, first: Background):
    """A start's first batch. The step is compiled for the data config's shapes while the batch
    is still being read (the memory report comes before any data), again if the batch has
    other rows."""
    config = getattr(self.batches, "config", None)
    if config is not None:
      reporting.compile_step(
        self.step_fn, self.state, config.batch_size, config.seq_len, self.model, self.peak
      )
    local = first.result()
    placed = self.step_fn.place_batch(local)
    if not self.step_fn.compiled_for(placed):  # no config, or rows other than it says
      rows, length = local["inputs"].shape
      reporting.compile_step(
        self.step_fn, self.state, rows * jax.process_count(), length, self.model, self.peak
      )
    return local, placed

  def _record_config(self) -> None:
    """The config of this (re)start, once its first step ran: a start that fails (a setting the
    checkpoint or the data does not take) leaves the earlier one."""
    if self.lead and self.meta.get("gin_config"):
      storage.write_text(storage.join(self.workdir, "config.gin"), self.meta["gin_config"])

  def _report(self, writer: MetricsWriter, clock: float) -> tuple[dict[str, Any], float]:
    pending, self._pending, self._rolled_back = self._pending, None, False
    assert pending is not None
    self._reported = pending
    out, clock = reporting.report(
      pending, writer, self.config, self.model, self.peak, self.mesh, clock, self.language_set
    )
    for callback in self.callbacks:
      callback.on_metrics(self, pending.step, out)
    return out, clock

  def _save_due(self, stop: str | None) -> bool:
    ckpt = self.checkpointer
    return ckpt is not None and (
      ckpt.should_save(self.step) or bool(stop) or self.step == self.num_steps
    )

  def roll_back(self, *, spike_step: int, skip_batches: int) -> None:
    """Back to the last checkpoint, the data resumed `skip_batches` past the batch of
    `spike_step` (whose metrics are being reported now)."""
    ckpt, batches, reported = self.checkpointer, self.batches, self._reported
    if ckpt is None or reported is None:
      raise ValueError("rolling back needs checkpoints (CheckpointConfig.enabled)")
    spike_position = reported.position
    ckpt.wait()
    restored = ckpt.restore_latest(batches, run_meta=self.meta)
    if restored is None:
      raise RuntimeError(
        f"loss spike at step {spike_step} but no checkpoint to roll back to; save "
        f"more often (CheckpointConfig.every_steps) or use SpikeConfig.mode='skip'"
      )
    self.state, _ = restored
    skip = max(spike_position + skip_batches - batches.position, 0)
    batches.skip(skip)
    self.step = int(self.state.step)
    self._rolled_back = True
    logging.warning(
      "loss spike at step %d: rolled back to step %d and skipped %d batches (data "
      "resumes at position %d)",
      spike_step,
      self.step,
      skip,
      batches.position,
    )

  def _close_after_failure(self, e: BaseException, writer, callbacks) -> None:
    """The run already failed: an error closing a callback, the writer or the checkpointer (a
    full disk) is logged, and must not hide why it failed."""
    ckpt = self.checkpointer
    closers = [(type(c).__name__, c.close) for c in callbacks]
    if ckpt is not None:
      closers.append(("checkpointer", ckpt.close))
    if writer is not None:
      closers.append(("metrics writer", writer.close))
    for name, close in closers:
      try:
        close()
      except Exception as also:  # noqa: BLE001
        logging.error("closing the %s after the failure: %s: %s", name, type(also).__name__, also)
    if ckpt is not None and not isinstance(e, (CheckpointSaveError, KeyboardInterrupt)):
      e.add_note(reporting.saved_note(ckpt))


def train(
  model: ModelConfig,
  optimizer: OptimizerConfig,
  mesh_config: sharding.MeshConfig,
  trainer: TrainerConfig,
  batches: Iterator[dict[str, np.ndarray]],
  workdir: str,
  *,
  checkpoint: CheckpointConfig | None = None,
  spikes: SpikeConfig = SpikeConfig(),
  metadata: dict[str, Any] | None = None,
  start_over: bool = False,
  language_set: languages.Languages = languages.DEFAULT,
  callbacks: Sequence[Callback] | None = None,
) -> dict[str, Any]:
  """Builds a Trainer and runs it (see Trainer.run); `callbacks` None: the defaults
  (preemption, and spike rollback when SpikeConfig.mode = 'rollback')."""
  return Trainer(
    model,
    optimizer,
    mesh_config,
    trainer,
    batches,
    workdir,
    checkpoint=checkpoint,
    spikes=spikes,
    metadata=metadata,
    language_set=language_set,
    callbacks=callbacks,
  ).run(start_over=start_over)


def _initial_state(ckpt, step_fn: TrainStep, batches, trainer: TrainerConfig, meta):
  """Resume (the default whenever the workdir has checkpoints), or start from imported
  parameters, or from the seed."""
  restored = (
    ckpt.restore_latest(
      batches,
      reset_optimizer=trainer.reset_optimizer,
      reset_data=trainer.reset_data,
      run_meta=meta,
    )
    if ckpt
    else None
  )
  if restored is not None:
    state, saved_meta = restored
    logging.info(
      "resumed from checkpoint step %d (data position %d)",
      int(state.step),
      saved_meta["data_position"],
    )
    return state
  if trainer.init_params_from:
    state = step_fn.init_from_params(load_initial_params(trainer.init_params_from, step_fn))
    logging.info("initial parameters from %s", trainer.init_params_from)
    return state
  return step_fn.init(trainer.seed)


def _save_if_sound(ckpt: Checkpointer, step_fn: TrainStep, step: int, state, batches, meta):
  """Never a checkpoint of a non-finite state or in the middle of a non-finite streak: it would
  rotate a good checkpoint out (the parameters of a skipped step are the last finite ones
  anyway)."""
  in_a_row = int(state.nonfinite_in_a_row)
  reason = (
    f"{in_a_row} non-finite update(s) in a row"
    if in_a_row
    else None
    if step_fn.is_finite(state)
    else "the state holds NaN/Inf values"
  )
  if reason:
    logging.warning(
      "no checkpoint at step %d: %s; the newest checkpoint stays step %s",
      step,
      reason,
      max(ckpt.steps_on_disk(), default="none"),
    )
    return
  ckpt.save(step, state, batches, meta)
