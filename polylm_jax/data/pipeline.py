"""Packed, sharded batches from a seqio Task or Mixture, as numpy dicts the train step consumes
(inputs, targets, weights, positions, segment_ids, languages; packing.py says how rows are made).

Each process reads only its shard (seqio ShardInfo) and returns its rows of the global batch; the
trainer assembles global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import logging
import threading
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf

from polylm_jax import console
from polylm_jax.background import Background
from polylm_jax.data import cache, packing
from polylm_jax.typecheck import check_fields


def mixture_tasks(name: str) -> list[tuple[seqio.Task, float]]:
  """(task, rate) of a Mixture (nested mixtures flattened), or [(task, 1.0)] for a Task.

  Tasks are looked up by name now: a seqio Mixture keeps the Task objects it was built with, so a
  task registered anew since (TextCorpora replacing a sample task) would otherwise be stale."""
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    return [(seqio.TaskRegistry.get(t.name), float(provider.get_rate(t))) for t in provider.tasks]
  return [(provider, 1.0)]


def _task_seed(seed: int, index: int) -> int:
  return seed * 1_000_003 + index  # distinct, reproducible shuffles per task


def _use_cache(task: seqio.Task, config: DataConfig) -> bool:
  use_cached = config.use_cached and task.supports_caching
  if use_cached and not task.cache_dir:
    raise ValueError(
      f"DataConfig.use_cached: task {task.name!r} has no completed cache in "
      f"DataConfig.cache_dirs={list(config.cache_dirs)} (make one with "
      f"polylm-cache)"
    )
  return use_cached


def _task_rows(
  task: seqio.Task,
  index: int,
  config: DataConfig,
  *,
  shard_index: int,
  num_shards: int,
  shuffle: bool,
  num_epochs: int | None,
) -> tf.data.Dataset:
  """One task's documents, packed into rows (seqio reads, shards, preprocesses, shuffles)."""
  use_cached = _use_cache(task, config)
  if config.use_cached and not use_cached:
    logging.info(
      "DataConfig.use_cached: task %s is not cacheable, preprocessed on the fly", task.name
    )
  docs = task.get_dataset(
    sequence_length=None,
    split=config.split,
    shuffle=shuffle,
    seed=_task_seed(config.seed, index),
    use_cached=use_cached,
    shard_info=seqio.ShardInfo(shard_index, num_shards),
    num_epochs=num_epochs,
    trim_output_features=False,
  )
  if "targets" not in docs.element_spec:
    raise ValueError(
      f"task {task.name!r} has no 'targets' feature (features: {sorted(docs.element_spec)})"
    )
  if "loss_weights" in docs.element_spec:  # instruction examples: packed whole, prompts weight 0
    return packing.pack_examples(docs, config.seq_len)
  if cache.is_packed(docs.element_spec):  # rows already (a packed-row task, cached or not)
    cache.check_row_length(task.name, docs, config.seq_len)
    return docs.map(
      lambda r: {k: tf.ensure_shape(r[k], [config.seq_len]) for k in packing.ROW_KEYS}
    )
  return packing.pack(docs, config.seq_len, flush=num_epochs is not None)


def _get_dataset(
  config: DataConfig, *, shard_index: int, num_shards: int, shuffle: bool, num_epochs: int | None
) -> tf.data.Dataset:
  """Packed rows of the mixture: each task packed on its own, rows mixed by the mixture's rates
  (so rates are shares of tokens, every row holds one task's documents). A finite pass
  (num_epochs set, e.g. evaluation) reads the tasks one after another instead."""
  pairs = mixture_tasks(config.mixture)
  seqio.add_global_cache_dirs(list(config.cache_dirs))  # where task.cache_dir looks
  rows = [
    _task_rows(
      t,
      i,
      config,
      shard_index=shard_index,
      num_shards=num_shards,
      shuffle=shuffle,
      num_epochs=num_epochs,
    )
    for i, (t, _) in enumerate(pairs)
  ]
  if num_epochs is not None or len(rows) == 1:
    ds = rows[0]
    for more in rows[1:]:
      ds = ds.concatenate(more)
    return ds
  total = sum(rate for _, rate in pairs)
  return tf.data.Dataset.sample_from_datasets(
    rows, weights=[rate / total for _, rate in pairs], seed=config.seed
  )


def _source_files(task: seqio.Task, split: str) -> list[str]:
  try:
    return list(task.source.list_shards(split))
  except Exception:  # e.g. a FunctionDataSource: no files to name
    return []


def check_has_data(names, config: DataConfig) -> None:
  """Every task of these mixtures must yield at least one token in `config.split`: a source whose
  records are all dropped (a wrong text field, say) or an empty file fails here, at start, naming
  the task, its files and the drop counts (an infinite stream of nothing would hang training)."""
  from polylm_jax.data import documents

  seqio.add_global_cache_dirs(list(config.cache_dirs))
  seen = set()
  for name in names:
    for task, _ in mixture_tasks(name):
      if task.name in seen:
        continue
      seen.add(task.name)
      ds = task.get_dataset(
        sequence_length=None,
        split=config.split,
        shuffle=False,
        use_cached=_use_cache(task, config),
        num_epochs=1,
        trim_output_features=False,
      )

      def tokens(ex):
        t = ex["targets"]
        return tf.size(t.flat_values if isinstance(t, tf.RaggedTensor) else t)

      if next(iter(ds.map(tokens).filter(lambda n: n > 0).take(1)), None) is not None:
        continue
      shards = _source_files(task, config.split)
      where = (
        f" (read from {shards[:3]}{f' and {len(shards) - 3} more' if len(shards) > 3 else ''})"
        if shards
        else ""
      )
      dropped = documents.dropped_records().get(task.name)
      raise ValueError(
        f"task {task.name!r} yields no {config.split} documents{where}; records dropped: "
        f"{dropped or 'none'}. Check the files and the record settings (e.g. "
        f"TextCorpora.text_field, record_format, min_chars, min_lang_score)"
      )


@dataclasses.dataclass(frozen=True)
class DataConfig:
  mixture: str = "polylm_sample"  # a registered seqio Mixture or Task
  seq_len: int = 128  # packed row length; must not exceed the model's max_length
  batch_size: int = 8  # global batch, in rows
  seed: int = 0
  split: str = "train"
  shuffle: bool = True
  # Read cacheable tasks from their Beam-made caches (polylm-cache) in these directories.
  use_cached: bool = False
  cache_dirs: tuple[str, ...] = ()

  def __post_init__(self):
    check_fields(self)
    for name in ("seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"DataConfig.{name}={getattr(self, name)} must be >= 1")


class _Once(logging.Filter):
  """Lets each distinct warning through once: seqio repeats its uncached-FunctionDataSource advice
  for every task of a mixture (18 times for the sample)."""

  def __init__(self):
    super().__init__()
    self.seen: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.WARNING:
      return True
    msg = record.getMessage()
    if msg in self.seen:
      return False
    self.seen.add(msg)
    return True


_ONCE = _Once()


def _hide_tf_from_accelerators() -> None:
  # tf.data only needs the CPU; on a GPU host TF would otherwise grab GPU memory JAX needs.
  try:
    with console.filtered_stderr():  # TF's GPU probe prints "failed call to cuInit" without one
      tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # already initialised: visible devices can no longer change, nothing to do


def packed_dataset(
  config: DataConfig, *, shard_index: int = 0, num_shards: int = 1, num_epochs: int | None = None
) -> tf.data.Dataset:
  """This shard's packed rows, batched to batch_size // num_shards rows."""
  _hide_tf_from_accelerators()
  absl_logger = logging.getLogger("absl")
  if _ONCE not in absl_logger.filters:
    absl_logger.addFilter(_ONCE)
  if config.batch_size % num_shards:
    raise ValueError(
      f"DataConfig.batch_size={config.batch_size} is not divisible by the "
      f"{num_shards} data-loading processes"
    )
  for registry in (seqio.MixtureRegistry, seqio.TaskRegistry):
    if config.mixture in registry.names():
      break
  else:
    raise ValueError(
      f"DataConfig.mixture={config.mixture!r} is not a registered seqio Mixture or "
      f"Task (import the module that registers it, e.g. polylm_jax.data.tasks)"
    )
  ds = _get_dataset(
    config,
    shard_index=shard_index,
    num_shards=num_shards,
    shuffle=config.shuffle,
    num_epochs=num_epochs,
  )
  rows = config.batch_size // num_shards
  return ds.batch(rows, drop_remainder=True).prefetch(2)


def _to_numpy(raw) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in raw.items()}


class BatchIterator:
  """This process's packed batches, resumable exactly.

  The state is the tf.data iterator's own checkpoint (shuffle buffers, mixture sampler, in-memory
  caches of small tasks), written per process with `tf.train.Checkpoint`: restoring it resumes at
  the very next batch in O(1), whatever the position. Its size is that of the buffered elements
  (about 6 MB for the sample mixture) and grows with the shuffle buffers (docs/data.md).
  `position` counts the batches this iterator has returned.
  """

  def __init__(self, config: DataConfig, *, shard_index: int = 0, num_shards: int = 1):
    self.config = config
    self.shard_index = shard_index
    self._it = iter(packed_dataset(config, shard_index=shard_index, num_shards=num_shards))
    self.position = 0
    self._peeked: dict[str, np.ndarray] | None = None

  def __iter__(self):
    return self

  def warm_up(self) -> None:
    """Fetches the first batch now (filling the shuffle buffers, opening the files) and keeps it
    for the first `next`, so whoever calls `next` later does not wait for that."""
    if self._peeked is None and self.position == 0:
      self._peeked = _to_numpy(next(self._it))

  def __next__(self) -> dict[str, np.ndarray]:
    if self._peeked is not None:
      batch, self._peeked = self._peeked, None
    else:
      batch = _to_numpy(next(self._it))
    self.position += 1
    return batch

  def skip(self, n: int) -> None:
    for _ in range(n):
      if self._peeked is not None:
        self._peeked = None
      else:
        next(self._it)
    self.position += n

  def save(self, directory: str) -> None:
    if self._peeked is not None:  # the tf.data state is one batch ahead of `position`
      raise RuntimeError("BatchIterator.save before its warmed-up first batch was taken")
    tf.train.Checkpoint(iterator=self._it).write(f"{directory}/process_{self.shard_index}")

  def restore(self, directory: str, position: int) -> None:
    path = f"{directory}/process_{self.shard_index}"
    if not tf.io.gfile.exists(path + ".index"):
      raise FileNotFoundError(f"no data-iterator state for process {self.shard_index} at {path}")
    tf.train.Checkpoint(iterator=self._it).read(path).assert_consumed()
    self.position = position
    self._peeked = None  # the restored state replaces whatever was fetched before


def batches(
  config: DataConfig, *, shard_index: int = 0, num_shards: int = 1, num_epochs: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
  if num_epochs is None:
    return BatchIterator(config, shard_index=shard_index, num_shards=num_shards)
  return (
    _to_numpy(raw)
    for raw in packed_dataset(
      config, shard_index=shard_index, num_shards=num_shards, num_epochs=num_epochs
    )
  )


def eval_batches(
  config: DataConfig, *, shard_index: int = 0, num_shards: int = 1, max_batches: int = 4
) -> list[dict[str, np.ndarray]]:
  """Up to `max_batches` packed batches of one pass over a (validation) split, the last one
  padded with zero-weight rows, so held-out loss is computed on the same tokens every time."""
  rows = config.batch_size // num_shards
  config = dataclasses.replace(config, shuffle=False)
  ds = _get_dataset(
    config, shard_index=shard_index, num_shards=num_shards, shuffle=False, num_epochs=1
  )
  out = []
  for raw in ds.batch(rows).take(max_batches):
    batch = _to_numpy(raw)
    short = rows - batch["inputs"].shape[0]
    if short:
      batch = {
        k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()
      }
    out.append(batch)
  if not out:
    raise ValueError(f"{config.mixture!r} has no {config.split!r} data for evaluation")
  return out


class HeldOutSets(collections.abc.Mapping):
  """{name: eval batches}, built at the first evaluation rather than before step 1 (building
  18 languages' held-out pipelines takes seconds the first step should not wait for)."""

  def __init__(self, configs: dict[str, DataConfig], *, shard_index: int = 0, num_shards: int = 1):
    self.configs = configs
    self.shard_index, self.num_shards = shard_index, num_shards
    self._built: dict[str, list[dict[str, np.ndarray]]] | None = None

  def _sets(self) -> dict[str, list[dict[str, np.ndarray]]]:
    if self._built is None:
      self._built = {
        name: eval_batches(cfg, shard_index=self.shard_index, num_shards=self.num_shards)
        for name, cfg in self.configs.items()
      }
    return self._built

  def __getitem__(self, name: str):
    return self._sets()[name]

  def __iter__(self):
    return iter(self.configs)

  def __len__(self) -> int:
    return len(self.configs)


class StagedBatches:
  """Batches that follow a curriculum: stage i's mixture feeds steps from its start_step on.

  Resumable exactly, also across stage boundaries: the state is the stage index plus the current
  stage's `BatchIterator` state; a stage's iterator always starts fresh (seeded with seed + stage)
  when the stage begins, so where a run restarts does not change what it sees.

  The next stage's iterator is built in a background thread `Curriculum.prepare_ahead_steps`
  batches before its boundary (its tf.data pipeline and shuffle buffers take a while to fill), so
  the switch costs about one ordinary step instead of a stall; building it early changes nothing
  it yields. A failed background build fails the switch, in the training thread.
  """

  def __init__(
    self,
    curriculum,
    config: DataConfig,
    *,
    shard_index: int = 0,
    num_shards: int = 1,
  ):
    self.curriculum = curriculum
    self.config = config
    self.shard_index, self.num_shards = shard_index, num_shards
    self.mixtures = curriculum.mixtures(config.split)
    self.position = 0
    self.stage: int | None = None
    self._inner: BatchIterator | None = None
    self._ahead: dict[int, Background] = {}  # stage -> its iterator, being built

  def _stage_iterator(self, stage: int) -> BatchIterator:
    cfg = dataclasses.replace(
      self.config, mixture=self.mixtures[stage], seed=self.config.seed + stage
    )
    return BatchIterator(cfg, shard_index=self.shard_index, num_shards=self.num_shards)

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

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    inner = self._enter(self.curriculum.stage_at(self.position))
    batch = next(inner)
    self.position += 1
    return batch

  def skip(self, n: int) -> None:
    for _ in range(n):
      next(self)

  def save(self, directory: str) -> None:
    tf.io.gfile.makedirs(directory)
    if self._inner is not None:
      self._inner.save(directory)
    with tf.io.gfile.GFile(f"{directory}/stage_{self.shard_index}.json", "w") as f:
      f.write(
        json.dumps(
          {"stage": self.stage, "inner_position": self._inner.position if self._inner else 0}
        )
      )

  def restore(self, directory: str, position: int) -> None:
    with tf.io.gfile.GFile(f"{directory}/stage_{self.shard_index}.json") as f:
      saved = json.loads(f.read())
    self.position = position
    self.stage, self._inner = None, None
    stage = self.curriculum.stage_at(position)
    inner = self._enter(stage)
    if saved["stage"] == stage:
      inner.restore(directory, saved["inner_position"])
