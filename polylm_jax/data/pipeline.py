"""Packed, sharded batches from a seqio Task or Mixture, as numpy dicts the train step consumes
(inputs, targets, weights, positions, segment_ids, languages; packing.py says how rows are made).

A dataset here is one shard (seqio ShardInfo) of every task, packed and mixed; resumable.py makes
the training batches from such row streams, and the trainer assembles global arrays from each
process's rows with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import logging
from typing import Callable, Iterator

import numpy as np
import seqio
import tensorflow as tf

from polylm_jax import console
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
  # Each row stream (shard) draws its own sequence of tasks; shard 0's is that of config.seed.
  return tf.data.Dataset.sample_from_datasets(
    rows, weights=[rate / total for _, rate in pairs], seed=config.seed + 1_000_003 * shard_index
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
  # Independent row streams the global batch is drawn from (data/resumable.py); fixed for a run.
  # 0: the number of processes of its first start. A resume may use any process count that
  # divides it, with the same batches.
  streams: int = 0

  def __post_init__(self):
    check_fields(self)
    for name in ("seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"DataConfig.{name}={getattr(self, name)} must be >= 1")
    if self.streams < 0:
      raise ValueError(f"DataConfig.streams={self.streams} must be >= 0 (0: one per process)")


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


def to_numpy(raw) -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in raw.items()}


def batches(
  config: DataConfig, *, shard_index: int = 0, num_shards: int = 1, num_epochs: int | None = None
) -> Iterator[dict[str, np.ndarray]]:
  if num_epochs is None:
    from polylm_jax.data.resumable import BatchIterator

    return BatchIterator(config, process_index=shard_index, process_count=num_shards)
  return (
    to_numpy(raw)
    for raw in packed_dataset(
      config, shard_index=shard_index, num_shards=num_shards, num_epochs=num_epochs
    )
  )


def eval_batches(
  config: DataConfig,
  *,
  shard_index: int = 0,
  num_shards: int = 1,
  max_batches: int = 4,
  allow_empty: bool = False,
) -> list[dict[str, np.ndarray]]:
  """Up to `max_batches` packed batches of one pass over a (validation) split, the last one
  padded with zero-weight rows, so held-out loss is computed on the same tokens every time.
  `allow_empty`: a shard with no data gives [] (another process's shard may have some)."""
  rows = config.batch_size // num_shards
  config = dataclasses.replace(config, shuffle=False)
  ds = _get_dataset(
    config, shard_index=shard_index, num_shards=num_shards, shuffle=False, num_epochs=1
  )
  out = []
  for raw in ds.batch(rows).take(max_batches):
    batch = to_numpy(raw)
    short = rows - batch["inputs"].shape[0]
    if short:
      batch = {
        k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in batch.items()
      }
    out.append(batch)
  if not out and not allow_empty:
    raise ValueError(f"{config.mixture!r} has no {config.split!r} data for evaluation")
  return out


class HeldOutSets(collections.abc.Mapping):
  """{name: eval batches}, built at the first evaluation rather than before step 1 (building
  18 languages' held-out pipelines takes seconds the first step should not wait for).

  With several processes each reads its shard, and shards of a small validation split give
  different numbers of batches; every process must run the same number of (collective) eval
  steps, so `agree` (the counts of all processes -> the largest, e.g. an allgather) sets the
  count and shorter sets are padded with batches of zero weight."""

  def __init__(
    self,
    configs: dict[str, DataConfig],
    *,
    shard_index: int = 0,
    num_shards: int = 1,
    agree: Callable[[list[int]], list[int]] | None = None,
  ):
    self.configs = configs
    self.shard_index, self.num_shards = shard_index, num_shards
    self.agree = agree
    self._built: dict[str, list[dict[str, np.ndarray]]] | None = None

  def _sets(self) -> dict[str, list[dict[str, np.ndarray]]]:
    if self._built is None:
      built = {
        name: eval_batches(
          cfg,
          shard_index=self.shard_index,
          num_shards=self.num_shards,
          allow_empty=self.agree is not None,
        )
        for name, cfg in self.configs.items()
      }
      if self.agree is not None:
        counts = self.agree([len(b) for b in built.values()])
        for (name, batches), count in zip(built.items(), counts):
          if count == 0:
            raise ValueError(f"{self.configs[name].mixture!r} has no validation data")
          rows = self.configs[name].batch_size // self.num_shards
          length = self.configs[name].seq_len
          empty = {
            k: np.zeros((rows, length), np.float32 if k == "weights" else np.int32)
            for k in packing.ROW_KEYS
          }
          batches.extend(dict(empty) for _ in range(count - len(batches)))
      self._built = built
    return self._built

  def __getitem__(self, name: str):
    return self._sets()[name]

  def __iter__(self):
    return iter(self.configs)

  def __len__(self) -> int:
    return len(self.configs)
