"""The training loop: build mesh and step, resume from the latest checkpoint, feed batches, log
metrics, save checkpoints (periodically, at the end, on SIGTERM / preemption), react to loss spikes
and stop on repeated non-finite updates.

Takes any iterator of numpy batches; checkpointing needs one that can save and restore its state
(`polylm_jax.data.resumable.BatchIterator`). Imports no seqio/tensorflow/gin itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import time
from typing import Any, Iterator, Mapping

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
from polylm_jax.errors import CheckpointSaveError, NonFiniteError
from polylm_jax.io import locks, storage
from polylm_jax.kernels.common import BlockSizes
from polylm_jax.optimizer import OptimizerConfig
from polylm_jax.trainer import flops, memory_report
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

  def __post_init__(self):
    check_fields(self)
    for name in ("num_steps", "log_every", "max_nonfinite_in_a_row"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"TrainerConfig.{name}={getattr(self, name)} must be >= 1")
    for name in ("eval_every", "lm_eval_every"):
      if getattr(self, name) < 0:
        raise ValueError(f"TrainerConfig.{name}={getattr(self, name)} must be >= 0 (0: never)")
    if bool(self.lm_eval_tasks) != bool(self.lm_eval_every):
      raise ValueError(
        "TrainerConfig.lm_eval_tasks and lm_eval_every go together: set both "
        f"(got tasks={self.lm_eval_tasks!r}, every={self.lm_eval_every})"
      )


class _Preemption:
  """SIGTERM (how schedulers announce preemption) sets a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, JAX's preemption sync point still works
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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
  eval_sets: Mapping[str, list[dict[str, np.ndarray]]] | None = None,
  start_over: bool = False,
  benchmark=None,
) -> dict[str, Any]:
  """Runs up to `trainer.num_steps` steps; returns the last metrics, final state, step object.

  Process 0 holds the workdir's lock for the whole run. `start_over` moves an earlier run's files
  to <workdir>/previous/ first; without it a workdir with checkpoints is always resumed.
  `benchmark(step_fn, params) -> metrics` runs every `trainer.lm_eval_every` steps.
  """
  if trainer.num_steps is None:
    raise ValueError("TrainerConfig.num_steps is None: set the number of steps to train")
  lead = jax.process_index() == 0
  with locks.workdir_lock(workdir) if lead else contextlib.nullcontext():
    if start_over and lead:
      set_aside_previous_run(workdir)
    return _train(
      model,
      optimizer,
      mesh_config,
      trainer,
      batches,
      workdir,
      checkpoint,
      spikes,
      metadata,
      eval_sets,
      benchmark,
    )


def _log_step_memory(memory, mesh, work: memory_report.ModelWork, advice: str) -> None:
  device = mesh.devices.flat[0]
  where = f"{mesh.devices.size} x {device.device_kind}"
  hbm = memory_report.hbm_bytes(device)
  for line in memory_report.report_lines(memory, hbm, where, work):
    logging.info("%s", line)
  if hbm and memory.peak > hbm:
    logging.warning("the step needs more memory than the device has; %s", advice)


def _compile_first_step(step_fn, state, rows: int, length: int, model, peak) -> None:
  """Checks the batch against the mesh, compiles the step for batches of these shapes (from the
  data config: while the first batch is still being read) and logs what it needs per device."""
  step_fn.check_batch_shape(rows)
  sharding.check_process_rows(step_fn.batch_sharding, rows)
  mesh = step_fn.mesh
  work = memory_report.model_work(model, rows, length, mesh.devices.flat, peak)
  advice = memory_report.knobs(model, step_fn.loss_config, step_fn.optimizer_config)
  _log_step_memory(
    step_fn.compile_for(state, step_fn.abstract_batch(rows, length)), mesh, work, advice
  )


def _first_batch(batches) -> Background:
  return Background(lambda: next(batches), "first-batch")


@dataclasses.dataclass
class _Pending:
  """A step's metrics, still on device: read one step late, so the host never waits on the
  device between dispatches."""

  step: int
  metrics: dict[str, jax.Array]
  rows: int  # global rows of the batch
  seq_len: int
  position: int  # data position after this step's batch


def _train(
  model,
  optimizer,
  mesh_config,
  trainer,
  batches,
  workdir,
  checkpoint,
  spikes,
  metadata,
  eval_sets,
  benchmark,
):
  lead = jax.process_index() == 0
  mesh = sharding.make_mesh(mesh_config)
  step_fn = TrainStep(
    model,
    optimizer,
    mesh,
    mesh_config.effective_rules,
    trainer.num_steps,
    spikes,
    loss_config=trainer.loss,
    attention_blocks=trainer.attention_blocks,
  )
  logging.info(
    "mesh %s over %d %s device(s); model %s, %.4g parameters",
    dict(mesh.shape),
    mesh.devices.size,
    jax.devices()[0].platform,
    model.name,
    analytic_param_count(model),
  )
  ckpt = None
  if checkpoint is not None and checkpoint.enabled:
    for attr in ("save", "restore", "position"):
      if not hasattr(batches, attr):
        raise TypeError(
          "checkpointing needs a resumable batch iterator (save/restore/position, "
          "e.g. data.resumable.BatchIterator); set CheckpointConfig.enabled=False"
        )
    ckpt = Checkpointer(workdir, checkpoint, step_fn)
  if spikes.mode == "rollback" and ckpt is None:
    raise ValueError("SpikeConfig.mode='rollback' needs checkpoints (CheckpointConfig.enabled)")
  meta = dict(
    metadata or {},
    model_config=dataclasses.asdict(model),
    seed=trainer.seed,
    framing=framing.TRAINING.to_meta(),
    languages=list(languages.active().codes),
  )

  # The first batch (tf.data fills its shuffle buffers, opens every file) is fetched in the
  # background while the state is initialised and the step compiled; a resume must restore the
  # data state first.
  first = None if ckpt is not None and ckpt.steps_on_disk() else _first_batch(batches)
  try:
    state = _initial_state(ckpt, step_fn, batches, trainer, meta)
  except BaseException:
    if first is not None:
      first.wait()
    if ckpt is not None:
      ckpt.manager.close()
    raise
  if first is None and int(state.step) < trainer.num_steps:
    first = _first_batch(batches)
  peak = flops.peak_flops_per_device(jax.devices()[0], trainer.peak_flops_per_device)
  writer = MetricsWriter(
    workdir,
    tensorboard=trainer.tensorboard,
    total_steps=trainer.num_steps,
    start_step=int(state.step),
    progress_bar=trainer.progress_bar,
    enabled=lead,
  )
  eval_writer = None
  if (eval_sets and trainer.eval_every) or (benchmark is not None and trainer.lm_eval_every):
    eval_writer = MetricsWriter(
      workdir,
      filename="eval_metrics.jsonl",
      progress_bar=False,
      start_step=int(state.step),
      tensorboard=trainer.tensorboard,
      enabled=lead,
    )
  pending: _Pending | None = None
  last_time = time.perf_counter()
  last: dict[str, Any] = {}
  try:
    with _Preemption() as preemption:
      step = int(state.step)
      while step < trainer.num_steps:
        if first is not None:  # this start's first step: compile it and say what it needs
          config = getattr(batches, "config", None)  # the data's shapes, before its first batch
          if config is not None:
            _compile_first_step(step_fn, state, config.batch_size, config.seq_len, model, peak)
          local = first.result()
          placed = step_fn.place_batch(local)
          if not step_fn.compiled_for(placed):  # no config, or rows other than it says
            rows, length = local["inputs"].shape
            _compile_first_step(step_fn, state, rows * jax.process_count(), length, model, peak)
        else:
          local = next(batches)
          placed = step_fn.place_batch(local)
        state, metrics = step_fn(state, placed)
        if first is not None and lead and meta.get("gin_config"):
          # The config of this (re)start, once its first step ran: a start that fails (a
          # setting the checkpoint or the data does not take) leaves the earlier one.
          storage.write_text(storage.join(workdir, "config.gin"), meta["gin_config"])
        first = None
        step += 1
        rows, seq_len = local["inputs"].shape
        position = getattr(batches, "position", step)
        if pending is not None:
          last, last_time = _report(pending, writer, trainer, model, peak, mesh, last_time)
          if last["spike"] and spikes.mode == "rollback":
            state, step = _rollback(ckpt, batches, pending, spikes, meta)
            pending = None
            continue
        pending = _Pending(step, metrics, rows * jax.process_count(), seq_len, position)
        stop = preemption.requested or (ckpt is not None and ckpt.reached_preemption(step))
        if ckpt is not None and (ckpt.should_save(step) or stop or step == trainer.num_steps):
          _save_if_sound(ckpt, step_fn, step, state, batches, meta)
        if eval_writer is not None:
          _evaluate_if_due(eval_writer, step, trainer, step_fn, state.params, eval_sets, benchmark)
        if stop:
          logging.warning(
            "stopped at step %d for preemption; the checkpoint is being finalised", step
          )
          break
      if pending is not None:
        last, _ = _report(pending, writer, trainer, model, peak, mesh, last_time)
  except BaseException as e:
    if first is not None:  # failed before the first step took its batch
      first.wait()
    # The run already failed: an error closing the checkpointer or a writer (a full disk) is
    # logged, and must not hide why it failed.
    closers = [("checkpointer", ckpt.close)] if ckpt is not None else []
    closers.append(("metrics writer", writer.close))
    if eval_writer is not None:
      closers.append(("evaluation metrics writer", eval_writer.close))
    for name, close in closers:
      try:
        close()
      except Exception as also:  # noqa: BLE001
        logging.error("closing the %s after the failure: %s: %s", name, type(also).__name__, also)
    if ckpt is not None and not isinstance(e, (CheckpointSaveError, KeyboardInterrupt)):
      e.add_note(_saved_note(ckpt))
    raise
  writer.close()
  if eval_writer is not None:
    eval_writer.close()
  if ckpt is not None:
    ckpt.close()  # a failed final save raises here
  return {"metrics": last, "state": state, "train_step": step_fn}


def _saved_note(ckpt: Checkpointer) -> str:
  """What a failed run leaves to resume from (added to its error, the last line printed)."""
  try:
    steps = ckpt.steps_on_disk()
  except Exception as e:  # noqa: BLE001
    return f"the checkpoints in {ckpt.root} could not be listed ({type(e).__name__}: {e})"
  if not steps:
    return f"no checkpoint was saved in {ckpt.root}"
  return (
    f"checkpoints saved: steps {steps} in {ckpt.root}; a restart resumes from step {steps[-1]} "
    f"(the steps after it are not saved and will be redone)"
  )


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


def _evaluate_if_due(writer, step, trainer, step_fn, params, eval_sets, benchmark) -> None:
  due = lambda every: bool(every) and (step % every == 0 or step == trainer.num_steps)
  record = {}
  if eval_sets and due(trainer.eval_every):
    record.update(evaluate(step_fn, params, eval_sets))
  if benchmark is not None and due(trainer.lm_eval_every):
    record.update(benchmark(step_fn, params))
  if record:
    writer.write(step, record)


def evaluate(step_fn: TrainStep, params, eval_sets) -> dict[str, float]:
  """Held-out loss per evaluation set (e.g. per language): token-mean NLL over its batches."""
  out = {}
  for name, batches in eval_sets.items():
    total, weight = 0.0, 0.0
    for local in batches:
      loss_sum, w = step_fn.eval_sums(params, step_fn.place_batch(local))
      total, weight = total + float(loss_sum), weight + float(w)
    out[f"val_loss/{name}"] = total / max(weight, 1.0)
  return out


def _rollback(ckpt: Checkpointer, batches, pending, spikes: SpikeConfig, meta):
  """PaLM-style: back to the last checkpoint, data resumed `rollback_skip_batches` past the
  spike."""
  spike_step, spike_position = pending.step, pending.position
  ckpt.wait()
  restored = ckpt.restore_latest(batches, run_meta=meta)
  if restored is None:
    raise RuntimeError(
      f"loss spike at step {spike_step} but no checkpoint to roll back to; save "
      f"more often (CheckpointConfig.every_steps) or use SpikeConfig.mode='skip'"
    )
  state, meta = restored
  skip = spike_position + spikes.rollback_skip_batches - batches.position
  batches.skip(max(skip, 0))
  logging.warning(
    "loss spike at step %d: rolled back to step %d and skipped %d batches (data "
    "resumes at position %d)",
    spike_step,
    int(state.step),
    max(skip, 0),
    batches.position,
  )
  return state, int(state.step)


def _report(pending: _Pending, writer, trainer, model, peak, mesh, last_time):
  step, rows, seq_len = pending.step, pending.rows, pending.seq_len
  fetched = jax.device_get(pending.metrics)
  values = {k: v.item() for k, v in fetched.items() if np.ndim(v) == 0}
  now = time.perf_counter()
  dt = now - last_time
  tokens = rows * seq_len
  out = {
    "loss": values["loss"],
    "grad_norm": values["grad_norm"],
    "learning_rate": values["learning_rate"],
    "tokens_per_sec": tokens / dt,
    "step_time_s": dt,
    "skipped": values["skipped"],
    "nonfinite_total": values["nonfinite_total"],
    "spike": values["spike"],
    "batch_fingerprint": int(values["batch_fingerprint"]),
  }
  if "language_tokens" in fetched:  # training loss per language (slot 0: untagged tokens)
    for i, (total, count) in enumerate(
      zip(fetched["language_loss"][1:], fetched["language_tokens"][1:])
    ):
      if count > 0:
        out[f"loss/{languages.active().code(i + 1)}"] = float(total / count)
  if peak:
    per_token = flops.train_flops_per_token(model, seq_len)
    out["mfu"] = per_token * out["tokens_per_sec"] / (peak * mesh.devices.size)
  if values["nonfinite"]:
    logging.warning(
      "step %d: non-finite loss or gradient (loss=%s, grad_norm=%s): update skipped "
      "(%d in a row, %d in total)",
      step,
      values["loss"],
      values["grad_norm"],
      values["nonfinite_in_a_row"],
      values["nonfinite_total"],
    )
  if values["spike"]:
    logging.warning(
      "step %d: loss spike: loss %.4g (threshold %.4g), grad norm %.4g (threshold %.4g)%s",
      step,
      values["loss"],
      values["loss_threshold"],
      values["grad_norm"],
      values["grad_norm_threshold"],
      "; update skipped" if values["skipped"] else "",
    )
    out["loss_threshold"] = values["loss_threshold"]
    out["grad_norm_threshold"] = values["grad_norm_threshold"]
  writer.write(
    step, out, console=step % trainer.log_every == 0 or step == 1 or step == trainer.num_steps
  )
  if values["nonfinite_in_a_row"] >= trainer.max_nonfinite_in_a_row:
    raise NonFiniteError(
      f"stopping at step {step}: {values['nonfinite_in_a_row']} consecutive non-finite updates "
      f"(TrainerConfig.max_nonfinite_in_a_row={trainer.max_nonfinite_in_a_row}); the parameters "
      f"are those of the last finite step"
    )
  return out, now
