"""The training loop: build mesh and step, feed batches, log metrics, stop on repeated non-finite
updates. Takes any iterator of numpy batches, so it runs without seqio (e.g. synthetic data on the
GPU check machine); `polylm_jax.train.cli` wires it to the seqio pipeline and gin."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Iterator

import jax
import numpy as np

from polylm_jax import sharding
from polylm_jax.config import ModelConfig, analytic_param_count
from polylm_jax.train import flops
from polylm_jax.train.metrics import MetricsWriter
from polylm_jax.train.optimizer import OptimizerConfig
from polylm_jax.train.step import TrainStep


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  num_steps: int = 100
  seed: int = 0  # parameter init
  log_every: int = 10  # console / TensorBoard cadence (metrics.jsonl gets every step)
  max_nonfinite_in_a_row: int = 5  # K: stop after K consecutive skipped (non-finite) updates
  peak_flops_per_device: float | None = None  # None: look the device up in flops.PEAK_FLOPS_...
  tensorboard: bool = True
  progress_bar: bool | None = None  # None: only when stderr is a terminal


class NonFiniteError(RuntimeError):
  pass


def train(model: ModelConfig, optimizer: OptimizerConfig, mesh_config: sharding.MeshConfig,
          trainer: TrainerConfig, batches: Iterator[dict[str, np.ndarray]], workdir: str,
          ) -> dict[str, Any]:
  """Runs `trainer.num_steps` steps; returns the last step's metrics and the final state."""
  mesh = sharding.make_mesh(mesh_config)
  step_fn = TrainStep(model, optimizer, mesh, mesh_config.rules, trainer.num_steps)
  logging.info("mesh %s over %d %s device(s); model %s, %.4g parameters", dict(mesh.shape),
               mesh.devices.size, jax.devices()[0].platform, model.name,
               analytic_param_count(model))
  state = step_fn.init(trainer.seed)
  peak = flops.peak_flops_per_device(jax.devices()[0], trainer.peak_flops_per_device)
  writer = MetricsWriter(workdir, tensorboard=trainer.tensorboard, total_steps=trainer.num_steps,
                         progress_bar=trainer.progress_bar, enabled=jax.process_index() == 0)
  pending = None  # (step, metrics on device, rows x length): read one step late so the host
  last_time = time.perf_counter()  # never waits on the device between dispatches
  last: dict[str, Any] = {}
  try:
    for step in range(1, trainer.num_steps + 1):
      local = next(batches)
      if step == 1:
        step_fn.check_batch_shape(local["inputs"].shape[0] * jax.process_count())
      state, metrics = step_fn(state, step_fn.place_batch(local))
      rows, seq_len = local["inputs"].shape
      if pending is not None:
        last = _report(pending, writer, trainer, model, peak, mesh, last_time)
        last_time = last.pop("_now")
      pending = (step, metrics, rows * jax.process_count(), seq_len)
    if pending is not None:
      last = _report(pending, writer, trainer, model, peak, mesh, last_time)
      last.pop("_now")
  finally:
    writer.close()
  return {"metrics": last, "state": state, "train_step": step_fn}


def _report(pending, writer, trainer, model, peak, mesh, last_time) -> dict[str, Any]:
  step, metrics, rows, seq_len = pending
  values = {k: v.item() for k, v in jax.device_get(metrics).items()}
  now = time.perf_counter()
  dt = now - last_time
  tokens = rows * seq_len
  out = {
      "loss": values["loss"], "grad_norm": values["grad_norm"],
      "learning_rate": values["learning_rate"], "tokens_per_sec": tokens / dt, "step_time_s": dt,
      "skipped": values["skipped"], "nonfinite_total": values["nonfinite_total"],
  }
  if peak:
    per_token = flops.train_flops_per_token(model, seq_len)
    out["mfu"] = per_token * out["tokens_per_sec"] / (peak * mesh.devices.size)
  if values["skipped"]:
    logging.warning("step %d: non-finite loss or gradient (loss=%s, grad_norm=%s): update skipped "
                    "(%d in a row, %d in total)", step, values["loss"], values["grad_norm"],
                    values["nonfinite_in_a_row"], values["nonfinite_total"])
  writer.write(step, out, console=step % trainer.log_every == 0 or step == 1
               or step == trainer.num_steps)
  if values["nonfinite_in_a_row"] >= trainer.max_nonfinite_in_a_row:
    raise NonFiniteError(
        f"stopping at step {step}: {values['nonfinite_in_a_row']} consecutive non-finite updates "
        f"(TrainerConfig.max_nonfinite_in_a_row={trainer.max_nonfinite_in_a_row}); the parameters "
        f"are those of the last finite step")
  out["_now"] = now
  return out

