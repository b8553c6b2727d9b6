"""What a training step reports: its metrics, read from the device one step late (so the host
never waits between dispatches), written with throughput, MFU and per-language loss; the memory
a compiled step needs; what a failed run leaves to resume from."""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import numpy as np

from polylm_jax.errors import NonFiniteError
from polylm_jax.trainer import flops, memory_report


@dataclasses.dataclass
class Pending:
  """A step's metrics, still on device: read one step late, so the host never waits on the
  device between dispatches."""

  step: int
  metrics: dict[str, jax.Array]
  rows: int  # global rows of the batch
  seq_len: int
  position: int  # data position after this step's batch


def log_step_memory(memory, mesh, work: memory_report.ModelWork, advice: str) -> None:
  device = mesh.devices.flat[0]
  where = f"{mesh.devices.size} x {device.device_kind}"
  hbm = memory_report.hbm_bytes(device)
  for line in memory_report.report_lines(memory, hbm, where, work):
    logging.info("%s", line)
  if hbm and memory.peak > hbm:
    logging.warning("the step needs more memory than the device has; %s", advice)


def compile_step(step_fn, state, rows: int, length: int, model, peak) -> None:
  """Checks the batch against the mesh, compiles the step for batches of these shapes and logs
  what it needs per device."""
  from polylm_jax import sharding

  step_fn.check_batch_shape(rows)
  sharding.check_process_rows(step_fn.batch_sharding, rows)
  mesh = step_fn.mesh
  work = memory_report.model_work(model, rows, length, mesh.devices.flat, peak)
  advice = memory_report.knobs(model, step_fn.loss_config, step_fn.optimizer_config)
  log_step_memory(
    step_fn.compile_for(state, step_fn.abstract_batch(rows, length)), mesh, work, advice
  )


def saved_note(ckpt) -> str:
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


def report(pending: Pending, writer, trainer, model, peak, mesh, last_time, language_set):
  """A step's metrics (read one step late) written to metrics.jsonl / TensorBoard / the console,
  with warnings for non-finite updates and spikes; NonFiniteError after too many in a row."""
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
        out[f"loss/{language_set.code(i + 1)}"] = float(total / count)
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
