"""Packed, sharded batches from a seqio Task or Mixture, as numpy dicts the train step consumes.

Each process reads only its shard (seqio ShardInfo) and returns its rows of the global batch; the
trainer assembles global arrays with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator

import numpy as np
import seqio
import tensorflow as tf

BOS_ID = 1


class LanguageTaggedLMConverter(seqio.LMFeatureConverter):
  """seqio's LM converter that also packs the per-token language tag (`lang`) alongside
  `targets`, so every packed token still knows its language (`decoder_languages`)."""

  TASK_FEATURES = {"targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                   "lang": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}
  MODEL_FEATURES = {**seqio.LMFeatureConverter.MODEL_FEATURES,
                    "decoder_languages": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)}

  def _convert_example(self, features):
    out = dict(super()._convert_example(features))
    out["decoder_languages"] = features["lang"]
    return out

  def _convert_features(self, ds, task_feature_lengths):
    lengths = dict(task_feature_lengths, lang=task_feature_lengths["targets"])
    return super()._convert_features(ds, lengths)

  def get_model_feature_lengths(self, task_feature_lengths):
    out = dict(super().get_model_feature_lengths(task_feature_lengths))
    out["decoder_languages"] = task_feature_lengths["targets"]
    return out


def language_tagged(name: str) -> bool:
  """Whether every task of a mixture (or the task) carries the `lang` feature."""
  provider = seqio.get_mixture_or_task(name)
  return all("lang" in t.output_features for t in getattr(provider, "tasks", [provider]))


def _get_dataset(config: DataConfig, *, shard_index: int, num_shards: int, shuffle: bool,
                 num_epochs: int | None) -> tf.data.Dataset:
  """Packed rows (seqio), language-tagged when every task carries `lang`."""
  tagged = language_tagged(config.mixture)
  lengths = {"targets": config.seq_len}
  if tagged:
    lengths["lang"] = config.seq_len
  # Every document's first decoder input is BOS (id 1, as in PolyLM's vocabulary), not seqio's
  # default 0, which is <unk> here.
  converter = (LanguageTaggedLMConverter(pack=True, bos_id=BOS_ID) if tagged
               else seqio.DecoderFeatureConverter(pack=True, bos_id=BOS_ID))
  return seqio.get_dataset(
      config.mixture, task_feature_lengths=lengths, feature_converter=converter,
      dataset_split=config.split, shuffle=shuffle, num_epochs=num_epochs,
      shard_info=seqio.ShardInfo(shard_index, num_shards), seed=config.seed, verbose=False)

# Rename seqio's decoder features to the train step's batch keys.
FEATURE_KEYS = {
    "decoder_input_tokens": "inputs",
    "decoder_target_tokens": "targets",
    "decoder_loss_weights": "weights",
    "decoder_positions": "positions",
    "decoder_segment_ids": "segment_ids",
    "decoder_languages": "languages",  # only for language-tagged tasks
}


@dataclasses.dataclass(frozen=True)
class DataConfig:
  mixture: str = "polylm_sample"  # a registered seqio Mixture or Task
  seq_len: int = 128  # packed row length; must not exceed the model's max_length
  batch_size: int = 8  # global batch, in rows
  seed: int = 0
  split: str = "train"
  shuffle: bool = True


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
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    pass  # already initialised: visible devices can no longer change, nothing to do


def packed_dataset(config: DataConfig, *, shard_index: int = 0, num_shards: int = 1,
                   num_epochs: int | None = None) -> tf.data.Dataset:
  """This shard's packed rows, batched to batch_size // num_shards rows."""
  _hide_tf_from_accelerators()
  absl_logger = logging.getLogger("absl")
  if _ONCE not in absl_logger.filters:
    absl_logger.addFilter(_ONCE)
  if config.batch_size % num_shards:
    raise ValueError(f"DataConfig.batch_size={config.batch_size} is not divisible by the "
                     f"{num_shards} data-loading processes")
  for registry in (seqio.MixtureRegistry, seqio.TaskRegistry):
    if config.mixture in registry.names():
      break
  else:
    raise ValueError(f"DataConfig.mixture={config.mixture!r} is not a registered seqio Mixture or "
                     f"Task (import the module that registers it, e.g. polylm_jax.data.tasks)")
  ds = _get_dataset(config, shard_index=shard_index, num_shards=num_shards,
                    shuffle=config.shuffle, num_epochs=num_epochs)
  return ds.batch(config.batch_size // num_shards, drop_remainder=True)


def _to_numpy(raw) -> dict[str, np.ndarray]:
  batch = {ours: raw[theirs].numpy() for theirs, ours in FEATURE_KEYS.items() if theirs in raw}
  batch["weights"] = batch["weights"].astype(np.float32)
  return batch


class BatchIterator:
  """This process's packed batches, resumable exactly.

  The state is the tf.data iterator's own checkpoint (shuffle buffers, mixture sampler, in-memory
  caches of small tasks), written per process with `tf.train.Checkpoint`: restoring it resumes at
  the very next batch in O(1), whatever the position. Its size is that of the buffered elements
  (about 13 MB for the sample mixture) and grows with shuffle buffer and cached-task sizes.
  `position` counts the batches this iterator has returned.
  """

  def __init__(self, config: DataConfig, *, shard_index: int = 0, num_shards: int = 1):
    self.config = config
    self.shard_index = shard_index
    self._it = iter(packed_dataset(config, shard_index=shard_index, num_shards=num_shards))
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = _to_numpy(next(self._it))
    self.position += 1
    return batch

  def skip(self, n: int) -> None:
    for _ in range(n):
      next(self._it)
    self.position += n

  def save(self, directory: str) -> None:
    tf.train.Checkpoint(iterator=self._it).write(f"{directory}/process_{self.shard_index}")

  def restore(self, directory: str, position: int) -> None:
    path = f"{directory}/process_{self.shard_index}"
    if not tf.io.gfile.exists(path + ".index"):
      raise FileNotFoundError(f"no data-iterator state for process {self.shard_index} at {path}")
    tf.train.Checkpoint(iterator=self._it).read(path).assert_consumed()
    self.position = position


def batches(config: DataConfig, *, shard_index: int = 0, num_shards: int = 1,
            num_epochs: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  if num_epochs is None:
    return BatchIterator(config, shard_index=shard_index, num_shards=num_shards)
  return (_to_numpy(raw) for raw in packed_dataset(
      config, shard_index=shard_index, num_shards=num_shards, num_epochs=num_epochs))


def eval_batches(config: DataConfig, *, shard_index: int = 0, num_shards: int = 1,
                 max_batches: int = 4) -> list[dict[str, np.ndarray]]:
  """Up to `max_batches` packed batches of one pass over a (validation) split, the last one
  padded with zero-weight rows, so held-out loss is computed on the same tokens every time."""
  rows = config.batch_size // num_shards
  config = dataclasses.replace(config, shuffle=False)
  ds = _get_dataset(config, shard_index=shard_index, num_shards=num_shards, shuffle=False,
                    num_epochs=1)
  out = []
  for raw in ds.batch(rows).take(max_batches):
    batch = _to_numpy(raw)
    short = rows - batch["inputs"].shape[0]
    if short:
      batch = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)])
               for k, v in batch.items()}
    out.append(batch)
  if not out:
    raise ValueError(f"{config.mixture!r} has no {config.split!r} data for evaluation")
  return out


class StagedBatches:
  """Batches that follow a curriculum: stage i's mixture feeds steps from its start_step on.

  Resumable exactly, also across stage boundaries: the state is the stage index plus the current
  stage's `BatchIterator` state; a stage's iterator always starts fresh (seeded with seed + stage)
  when the stage begins, so where a run restarts does not change what it sees.
  """

  def __init__(self, curriculum, config: DataConfig, *, shard_index: int = 0,
               num_shards: int = 1):
    self.curriculum = curriculum
    self.config = config
    self.shard_index, self.num_shards = shard_index, num_shards
    self.mixtures = curriculum.mixtures(config.split)
    self.position = 0
    self.stage: int | None = None
    self._inner: BatchIterator | None = None

  def _stage_iterator(self, stage: int) -> BatchIterator:
    cfg = dataclasses.replace(self.config, mixture=self.mixtures[stage],
                              seed=self.config.seed + stage)
    return BatchIterator(cfg, shard_index=self.shard_index, num_shards=self.num_shards)

  def _enter(self, stage: int) -> None:
    if stage != self.stage:
      s = self.curriculum.stages[stage]
      logging.info("curriculum: stage %d %r feeds steps from %d (batch %d on): mixture %s",
                   stage, s.name, s.start_step + 1, self.position, self.mixtures[stage])
      self._inner = self._stage_iterator(stage)
      self.stage = stage

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    self._enter(self.curriculum.stage_at(self.position))
    batch = next(self._inner)
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
      f.write(json.dumps({"stage": self.stage, "inner_position":
                          self._inner.position if self._inner else 0}))

  def restore(self, directory: str, position: int) -> None:
    with tf.io.gfile.GFile(f"{directory}/stage_{self.shard_index}.json") as f:
      saved = json.loads(f.read())
    self.position = position
    self.stage, self._inner = None, None
    stage = self.curriculum.stage_at(position)
    self._enter(stage)
    if saved["stage"] == stage:
      self._inner.restore(directory, saved["inner_position"])
