"""What plugs into the training loop: preemption, loss-spike rollback, periodic evaluation and
profiling. The loop (loop.py) calls each callback at fixed points; the training command decides
which ones a run gets, so the engine never imports evaluation or anything above it.

The points, in the order of one step:
  check(trainer)                     once, before anything is restored or built
  on_start(trainer)                  once, after the state is initialised or restored
  on_metrics(trainer, step, metrics) a step's metrics, read one step late (spikes, logging)
  wants_stop(trainer, step)          a reason to stop after this step (its checkpoint is saved)
  after_step(trainer, step)          after the checkpoint decision (evaluation, profiling)
  close()                            once, whether the run finished or failed
"""

from __future__ import annotations

import logging
import math
import signal
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import numpy as np

from polylm_jax.trainer.metrics import MetricsWriter
from polylm_jax.trainer.spikes import SpikeConfig

if TYPE_CHECKING:
  from polylm_jax.trainer.loop import Trainer
  from polylm_jax.trainer.step import TrainStep

# (step_fn, params) -> {metric name: value}, e.g. eval.in_training.Benchmark
EvalFn = Callable[["TrainStep", Any], Mapping[str, float]]


class Callback:
  """Override the points you need; every one does nothing by default."""

  def check(self, trainer: Trainer) -> None:
    """Settings this callback needs, checked before anything is restored or built."""

  def on_start(self, trainer: Trainer) -> None:
    pass

  def on_metrics(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
    pass

  def wants_stop(self, trainer: Trainer, step: int) -> str | None:
    return None

  def after_step(self, trainer: Trainer, step: int) -> None:
    pass

  def close(self) -> None:
    pass


class Preemption(Callback):
  """SIGTERM (how schedulers announce preemption) or the checkpoint manager's preemption sync
  point: save a checkpoint after this step, then stop."""

  def __init__(self) -> None:
    self.requested = False
    self._previous: Any = None

  def on_start(self, trainer: Trainer) -> None:
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, JAX's preemption sync point still works
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping")
    self.requested = True

  def wants_stop(self, trainer: Trainer, step: int) -> str | None:
    ckpt = trainer.checkpointer
    if self.requested or (ckpt is not None and ckpt.reached_preemption(step)):
      return "preemption"
    return None

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class SpikeRollback(Callback):
  """PaLM-style: on a loss spike, back to the last checkpoint, with the data resumed
  `SpikeConfig.rollback_skip_batches` past the spike (SpikeConfig.mode = 'rollback')."""

  def __init__(self, config: SpikeConfig) -> None:
    self.config = config

  def check(self, trainer: Trainer) -> None:
    if trainer.checkpointer is None:
      raise ValueError("SpikeConfig.mode='rollback' needs checkpoints (CheckpointConfig.enabled)")

  def on_metrics(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
    if metrics.get("spike"):
      trainer.roll_back(spike_step=step, skip_batches=self.config.rollback_skip_batches)


def default_callbacks(spikes: SpikeConfig) -> list[Callback]:
  """What every training run gets: preemption handling, and spike rollback when configured."""
  out: list[Callback] = [Preemption()]
  if spikes.mode == "rollback":
    out.append(SpikeRollback(spikes))
  return out


def held_out_loss(eval_sets: Mapping[str, Any], token_bytes: np.ndarray | None = None) -> EvalFn:
  """Held-out loss per evaluation set (e.g. per language): `val_loss/<name>`, the token-mean
  NLL over its batches, and with `token_bytes` (data.tokenizer.token_bytes: the UTF-8 bytes of
  each id) `val_bpb/<name>`: the summed NLL of the predicted tokens (a document's tokens and
  its EOS) in bits over the summed bytes of their text, comparable across tokenizers."""
  text_bytes: dict[str, float] = {}  # per set: its batches are the same at every evaluation
  counter: list = []  # [(step_fn, its jitted byte count)], made at the first evaluation

  def count_bytes(step_fn: TrainStep, batch) -> float:
    if not counter or counter[0][0] is not step_fn:
      import jax.numpy as jnp
      from jax.sharding import NamedSharding, PartitionSpec

      replicated = NamedSharding(step_fn.mesh, PartitionSpec())
      table = jax.device_put(np.asarray(token_bytes, np.float32), replicated)
      fn = jax.jit(
        lambda t, targets, weights: jnp.sum(t[targets] * weights),
        in_shardings=(replicated, step_fn.batch_sharding, step_fn.batch_sharding),
        out_shardings=replicated,
      )
      counter[:] = [(step_fn, lambda b: fn(table, b["targets"], b["weights"]))]
    return float(counter[0][1](batch))

  def evaluate(step_fn: TrainStep, params) -> dict[str, float]:
    out, bpb = {}, {}
    for name, batches in eval_sets.items():
      total, weight, counted = 0.0, 0.0, 0.0
      counting = token_bytes is not None and name not in text_bytes
      for local in batches:
        batch = step_fn.place_batch(local)
        loss_sum, w = step_fn.eval_sums(params, batch)
        total, weight = total + float(loss_sum), weight + float(w)
        if counting:
          counted += count_bytes(step_fn, batch)
      out[f"val_loss/{name}"] = total / max(weight, 1.0)
      if counting:
        text_bytes[name] = counted
      if token_bytes is not None:
        bpb[f"val_bpb/{name}"] = total / math.log(2) / max(text_bytes[name], 1.0)
    return {**out, **bpb}  # the losses first, as the log line shows them

  return evaluate


class Evaluations(Callback):
  """Evaluations on the live parameters, each every N steps and at the last step, written
  together to eval_metrics.jsonl (and TensorBoard) by process 0."""

  def __init__(self, evaluations: list[tuple[int, EvalFn]]) -> None:
    self.evaluations = [(every, fn) for every, fn in evaluations if every]
    self.writer: MetricsWriter | None = None

  def on_start(self, trainer: Trainer) -> None:
    if self.evaluations:
      self.writer = MetricsWriter(
        trainer.workdir,
        filename="eval_metrics.jsonl",
        progress_bar=False,
        start_step=trainer.step,
        tensorboard=trainer.config.tensorboard,
        enabled=trainer.lead,
      )

  def after_step(self, trainer: Trainer, step: int) -> None:
    last = trainer.config.num_steps
    record: dict[str, float] = {}
    for every, fn in self.evaluations:
      if step % every == 0 or step == last:
        record.update(fn(trainer.step_fn, trainer.state.params))
    if record and self.writer is not None:
      self.writer.write(step, record)

  def close(self) -> None:
    if self.writer is not None:
      writer, self.writer = self.writer, None
      writer.close()


class Profile(Callback):
  """A JAX profiler trace of steps `start_step` .. `start_step + num_steps - 1` into
  `<workdir>/profile` (TensorBoard's profile plugin or Perfetto reads it), on every process;
  TrainerConfig.profile_start_step / profile_num_steps. A start resumed past `start_step`
  traces nothing."""

  def __init__(self, start_step: int, num_steps: int) -> None:
    self.start_step, self.num_steps = start_step, num_steps
    self.active = False

  def _start(self, trainer: Trainer) -> None:
    import jax

    from polylm_jax.io import storage

    jax.profiler.start_trace(storage.join(trainer.workdir, "profile"))
    self.active = True
    logging.info("profiling steps %d-%d", self.start_step, self.start_step + self.num_steps - 1)

  def on_start(self, trainer: Trainer) -> None:
    if trainer.step == self.start_step - 1:
      self._start(trainer)

  def after_step(self, trainer: Trainer, step: int) -> None:
    if step == self.start_step - 1 and not self.active:
      self._start(trainer)
    elif self.active and step >= self.start_step + self.num_steps - 1:
      import jax

      jax.block_until_ready(trainer.state.params)  # the traced steps' device work, whole
      self.close()

  def close(self) -> None:
    if self.active:
      import jax

      jax.profiler.stop_trace()
      self.active = False
      logging.info("profile written")
