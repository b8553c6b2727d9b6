"""Training batches that resume exactly: after a restart, on another number of processes, and
across the stages of a curriculum.

Row streams. A global batch of B rows is drawn from K = `DataConfig.streams` independent streams
of packed rows: stream k reads shard k of K of every task (seqio ShardInfo) and supplies rows
[k B/K, (k+1) B/K) of every global batch. Process p of M runs streams [p K/M, (p+1) K/M), which are
exactly the rows its devices hold (the trainer checks this against the batch sharding), so which
rows make global batch i depends on (seed, K, i) alone, never on M. Each stream's state (its
tf.data iterator checkpoint) is saved on its own, so a run checkpointed on M processes resumes on
any M' that divides K, with the same global batches from the resume step on.

K is fixed for the life of a run: `DataConfig.streams = 0` (the default) takes the number of
processes of the run's first start and records it with every data state; to be free to change the
process count later, set it to a multiple of every count you may use (e.g. 64). Its cost: a
process runs K/M tf.data pipelines, each with its own shuffle buffers (memory and saved state grow
with K/M, docs/data.md); nothing is read twice.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import threading

import numpy as np
import tensorflow as tf

from polylm_jax.background import Background
from polylm_jax.data.pipeline import DataConfig, packed_dataset, to_numpy
from polylm_jax.errors import DataStateMismatchError

STREAMS_FILE = "streams.json"


def saved_streams(directory: str) -> int:
  """The number of row streams a saved data state was drawn from (states written before streams
  existed hold one iterator per process, `process_<i>`: one stream each)."""
  path = f"{directory}/{STREAMS_FILE}"
  if tf.io.gfile.exists(path):
    with tf.io.gfile.GFile(path) as f:
      return int(json.loads(f.read())["streams"])
  legacy = tf.io.gfile.glob(f"{directory}/process_*.index")
  if not legacy:
    raise FileNotFoundError(f"no data-iterator state at {directory} (no {STREAMS_FILE})")
  return len(legacy)


def _write_streams(directory: str, streams: int) -> None:
  with tf.io.gfile.GFile(f"{directory}/{STREAMS_FILE}", "w") as f:
    f.write(json.dumps({"streams": streams}))


def _stream_path(directory: str, k: int) -> str:
  path = f"{directory}/stream_{k}"
  if not tf.io.gfile.exists(path + ".index") and tf.io.gfile.exists(
    f"{directory}/process_{k}.index"
  ):
    return f"{directory}/process_{k}"  # written before streams existed: process k ran stream k
  return path


def resume_streams(configured: int, saved: int, process_count: int) -> int:
  """The stream count a resumed run must use: the saved one. An explicit, different
  `DataConfig.streams` would change which rows every later batch holds, so it is refused."""
  if configured and configured != saved:
    raise DataStateMismatchError(
      f"DataConfig.streams={configured}, but this run's data was drawn from {saved} row streams "
      f"(saved with its checkpoints); the order of training rows depends on it. Set "
      f"DataConfig.streams = {saved} (or 0) to resume, or begin a new run"
    )
  if saved % process_count:
    raise DataStateMismatchError(
      f"this run's data is drawn from {saved} row streams (DataConfig.streams, fixed at its first "
      f"start), which {process_count} processes cannot split evenly; resume on a number of "
      f"processes that divides {saved}. (A run that is to change its process count sets "
      f"DataConfig.streams to a multiple of every count it may use.)"
    )
  return saved


class _Resumable(abc.ABC):
  """What both iterators share: iteration, and skipping by drawing (a rollback's skip)."""

  def __iter__(self):
    return self

  @abc.abstractmethod
  def __next__(self) -> dict[str, np.ndarray]: ...

  def skip(self, n: int) -> None:
    for _ in range(n):
      next(self)


class BatchIterator(_Resumable):
  """This process's rows of every global batch (module docstring), resumable exactly.

  The tf.data pipelines are built at the first batch, save or restore: a restored stream count
  that differs from the configured one (streams = 0 on another number of processes) never builds
  pipelines it would throw away. `position` counts the batches this iterator has returned.
  """

  def __init__(self, config: DataConfig, *, process_index: int = 0, process_count: int = 1):
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    self.streams = config.streams or process_count
    self.position = 0
    self._its: list | None = None
    self._peeked: dict[str, np.ndarray] | None = None

  def own_streams(self) -> range:
    k, m = self.streams, self.process_count
    if k % m:
      raise ValueError(
        f"DataConfig.streams={k} row streams cannot be split evenly over {m} processes; "
        f"choose a multiple of the process count"
      )
    if self.config.batch_size % k:
      raise ValueError(
        f"DataConfig.batch_size={self.config.batch_size} is not divisible by the {k} row "
        f"streams (DataConfig.streams, or the process count when it is 0)"
      )
    per = k // m
    return range(self.process_index * per, (self.process_index + 1) * per)

  def _iterators(self) -> list:
    if self._its is None:
      self._its = [
        iter(packed_dataset(self.config, shard_index=k, num_shards=self.streams))
        for k in self.own_streams()
      ]
    return self._its

  def _fetch(self) -> dict[str, np.ndarray]:
    parts = [to_numpy(next(it)) for it in self._iterators()]
    if len(parts) == 1:
      return parts[0]
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}

  def warm_up(self) -> None:
    """Fetches the first batch now (filling the shuffle buffers, opening the files) and keeps it
    for the first `next`, so whoever calls `next` later does not wait for that."""
    if self._peeked is None and self.position == 0:
      self._peeked = self._fetch()

  def __next__(self) -> dict[str, np.ndarray]:
    if self._peeked is not None:
      batch, self._peeked = self._peeked, None
    else:
      batch = self._fetch()
    self.position += 1
    return batch

  def save(self, directory: str) -> None:
    if self._peeked is not None:  # the tf.data state is one batch ahead of `position`
      raise RuntimeError("BatchIterator.save before its warmed-up first batch was taken")
    tf.io.gfile.makedirs(directory)
    for k, it in zip(self.own_streams(), self._iterators()):
      tf.train.Checkpoint(iterator=it).write(f"{directory}/stream_{k}")
    if self.process_index == 0:
      _write_streams(directory, self.streams)

  def start_afresh(self, position: int) -> None:
    """The configured pipelines from their beginning, counted from `position` on (a resume whose
    data settings changed, TrainerConfig.reset_data)."""
    self.streams, self._its, self._peeked = self.config.streams or self.process_count, None, None
    self.position = position

  def restore(self, directory: str, position: int) -> None:
    saved = resume_streams(self.config.streams, saved_streams(directory), self.process_count)
    if saved != self.streams:
      logging.info(
        "data: resuming %d row streams (as saved) on %d processes", saved, self.process_count
      )
      self.streams, self._its = saved, None
    for k, it in zip(self.own_streams(), self._iterators()):
      path = _stream_path(directory, k)
      if not tf.io.gfile.exists(path + ".index") or not tf.io.gfile.glob(path + ".data-*"):
        raise FileNotFoundError(f"no data-iterator state for row stream {k} at {path}")
      try:
        tf.train.Checkpoint(iterator=it).read(path).assert_consumed()
      except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError, AssertionError) as e:
        # Its files are there: a state of another pipeline (a data setting that changed).
        raise DataStateMismatchError(
          f"the data-iterator state of row stream {k} ({path}) does not fit the configured "
          f"pipeline ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''})"
        ) from e
    self.position = position
    self._peeked = None  # the restored state replaces whatever was fetched before


class StagedBatches(_Resumable):
  """Batches that follow a curriculum: stage i's mixture feeds steps from its start_step on.

  Resumable exactly, also across stage boundaries and process counts: the state is the stage
  index plus the current stage's `BatchIterator` state; a stage's iterator always starts fresh
  (seeded with seed + stage) when the stage begins, so where a run restarts does not change what
  it sees. Every stage uses the run's stream count.

  The next stage's iterator is built in a background thread `Curriculum.prepare_ahead_steps`
  batches before its boundary (its tf.data pipeline and shuffle buffers take a while to fill), so
  the switch costs about one ordinary step instead of a stall; building it early changes nothing
  it yields. A failed background build fails the switch, in the training thread.
  """

  def __init__(
    self, curriculum, config: DataConfig, *, process_index: int = 0, process_count: int = 1
  ):
    self.curriculum = curriculum
    self.config = config
    self.process_index, self.process_count = process_index, process_count
    self.streams = config.streams or process_count
    self.mixtures = curriculum.mixtures(config.split)
    self.position = 0
    self.stage: int | None = None
    self._inner: BatchIterator | None = None
    self._ahead: dict[int, Background] = {}  # stage -> its iterator, being built

  def _stage_iterator(self, stage: int) -> BatchIterator:
    cfg = dataclasses.replace(
      self.config,
      mixture=self.mixtures[stage],
      seed=self.config.seed + stage,
      streams=self.streams,
    )
    return BatchIterator(cfg, process_index=self.process_index, process_count=self.process_count)

  def _enter(self, stage: int) -> BatchIterator:
    """The iterator of `stage` (a fresh one when the stage changes)."""
    if stage != self.stage or self._inner is None:
      s = self.curriculum.stages[stage]
      logging.info(
        "curriculum: stage %d %r feeds steps from %d (batch %d on): mixture %s",
        stage,
        s.name,
        s.start_step + 1,
        self.position,
        self.mixtures[stage],
      )
      previous = [self._inner]
      self._inner = self._take_prepared(stage) or self._stage_iterator(stage)
      self.stage = stage
      # Tearing down a tf.data pipeline that is still prefetching blocks for seconds: let the
      # last reference to the previous stage's iterator go in a background thread.
      threading.Thread(target=previous.clear, name="release-stage", daemon=True).start()
    self._prepare_next(stage)
    return self._inner

  def _prepare_next(self, stage: int) -> None:
    nxt = stage + 1
    if nxt >= len(self.curriculum.stages) or nxt in self._ahead:
      return
    if (
      self.position >= self.curriculum.stages[nxt].start_step - self.curriculum.prepare_ahead_steps
    ):

      def build(nxt=nxt) -> BatchIterator:
        built = self._stage_iterator(nxt)
        built.warm_up()
        return built

      self._ahead[nxt] = Background(build, f"prepare-stage-{nxt}")

  def _take_prepared(self, stage: int) -> BatchIterator | None:
    job = self._ahead.pop(stage, None)
    if job is None:
      return None
    try:
      return job.result()
    except Exception as e:
      raise RuntimeError(f"building curriculum stage {stage}'s input pipeline failed") from e

  def __next__(self) -> dict[str, np.ndarray]:
    inner = self._enter(self.curriculum.stage_at(self.position))
    batch = next(inner)
    self.position += 1
    return batch

  def save(self, directory: str) -> None:
    tf.io.gfile.makedirs(directory)
    if self._inner is not None:
      self._inner.save(directory)
    if self.process_index == 0:
      if self._inner is None:
        _write_streams(directory, self.streams)
      with tf.io.gfile.GFile(f"{directory}/stage.json", "w") as f:
        position = self._inner.position if self._inner else 0
        f.write(json.dumps({"stage": self.stage, "inner_position": position}))

  def start_afresh(self, position: int) -> None:
    """The stage that feeds `position`, its pipelines from their beginning (TrainerConfig.
    reset_data)."""
    for job in self._ahead.values():
      job.wait()
    self._ahead = {}
    self.streams = self.config.streams or self.process_count
    self.position = position
    self.stage, self._inner = None, None
    self._enter(self.curriculum.stage_at(position))

  def restore(self, directory: str, position: int) -> None:
    path = f"{directory}/stage.json"
    if not tf.io.gfile.exists(path):  # written before streams existed: one file per process
      path = f"{directory}/stage_0.json"
    with tf.io.gfile.GFile(path) as f:
      saved = json.loads(f.read())
    self.streams = resume_streams(self.config.streams, saved_streams(directory), self.process_count)
    for job in self._ahead.values():  # built for the stream count before the restore
      job.wait()
    self._ahead = {}
    self.position = position
    self.stage, self._inner = None, None
    stage = self.curriculum.stage_at(position)
    inner = self._enter(stage)
    if saved["stage"] == stage:
      inner.restore(directory, saved["inner_position"])
