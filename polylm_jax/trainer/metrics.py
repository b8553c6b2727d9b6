"""Where step metrics go: a JSONL file and TensorBoard event files in the workdir (local or
object storage, through io.storage), and the console (a progress bar on a terminal, plain log
lines otherwise)."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import socket
import sys
import tempfile
import time
from typing import Any

from polylm_jax.io import storage

# In metrics.jsonl only: an identifier, not a quantity to plot or read in the log.
RECORD_ONLY = ("batch_fingerprint",)


def _plain(v: Any):
  v = float(v) if hasattr(v, "__float__") and not isinstance(v, (int, bool)) else v
  return None if isinstance(v, float) and not math.isfinite(v) else v


def _drop_records_after(path: str, step: int) -> None:
  """A resumed run redoes the steps after its checkpoint: their earlier records (and a line cut
  short by a crash) go, so the file holds each step once, in order."""
  if not storage.exists(path):
    return
  lines = storage.read_text(path).splitlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:
      continue
    if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
      kept.append(line)
  if len(kept) != len(lines):
    storage.write_text(path, "".join(line + "\n" for line in kept))


class EventFile:
  """A TensorBoard event file in a local directory: TFRecord records of TensorFlow `Event` protos,
  scalars as `simple_value` (what TensorBoard's scalar dashboard reads). Written with TensorFlow,
  which the data pipeline has loaded already, rather than tensorboardX (whose import loads torch
  when it is installed: seconds at every start)."""

  _count = itertools.count()

  def __init__(self, logdir: str):
    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    os.makedirs(logdir, mode=0o755, exist_ok=True)
    name = (
      f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
      f"{os.getpid()}.{next(self._count)}"
    )
    self._event = event_pb2.Event
    self._file = tf.io.TFRecordWriter(os.path.join(logdir, name))
    first = self._event(wall_time=time.time(), file_version="brain.Event:2")
    self._file.write(first.SerializeToString())
    self._file.flush()

  def add_scalars(self, step: int, values: dict[str, float]) -> None:
    """One event of these scalars, flushed: the file on disk always holds every step written
    (TensorBoard shows a running job's steps as they come; an upload copies all of them)."""
    if not values:
      return
    event = self._event(wall_time=time.time(), step=step)
    for tag, value in values.items():
      event.summary.value.add(tag=tag, simple_value=value)
    self._file.write(event.SerializeToString())
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricsWriter:
  """Writes only where `enabled` (process 0 of a multi-host run); a no-op elsewhere."""

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    tensorboard: bool = True,
    total_steps: int = 0,
    start_step: int = 0,
    progress_bar: bool | None = None,
    enabled: bool = True,
    filename: str = "metrics.jsonl",
  ):
    self.workdir = os.fspath(workdir)
    self.enabled = enabled
    path = storage.join(self.workdir, filename)
    if enabled:
      _drop_records_after(path, start_step)
    self._jsonl = storage.AppendLog(path) if enabled else None
    self._tb = None
    # TensorBoard writes event files into a local directory; for a workdir on object storage that
    # is a temporary one, uploaded with metrics.jsonl.
    self._tb_local: tempfile.TemporaryDirectory | None = None
    self._tb_uploaded = time.monotonic()
    if tensorboard and enabled:
      logdir = storage.join(self.workdir, "tensorboard")
      if storage.is_remote(logdir):
        self._tb_local = tempfile.TemporaryDirectory(prefix="polylm-tensorboard-")
        logdir = self._tb_local.name
      self._tb = EventFile(logdir)
    use_bar = enabled and (sys.stderr.isatty() if progress_bar is None else progress_bar)
    self._bar = None
    if use_bar:
      from tqdm import tqdm

      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

  def write(self, step: int, metrics: dict[str, Any], *, console: bool = True) -> None:
    if not self.enabled or self._jsonl is None:
      return
    record = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.add_scalars(
        step,
        {
          k: v
          for k, v in record.items()
          if k != "step"
          and k not in RECORD_ONLY
          and isinstance(v, (int, float))
          and not isinstance(v, bool)
        },
      )
      due = time.monotonic() - self._tb_uploaded >= storage.UPLOAD_EVERY_S
      if self._tb_local is not None and due:
        self._upload_tensorboard()
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}")
    elif console:
      shown = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in record.items()
        if k != "step" and k not in RECORD_ONLY and v is not None
      )
      logging.info("step %d: %s", step, shown)

  def _upload_tensorboard(self) -> None:
    assert self._tb is not None and self._tb_local is not None
    storage.upload_dir(self._tb_local.name, storage.join(self.workdir, "tensorboard"))
    self._tb_uploaded = time.monotonic()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      if self._tb_local is not None:
        self._upload_tensorboard()
        self._tb_local.cleanup()
    if self._bar is not None:
      self._bar.close()
