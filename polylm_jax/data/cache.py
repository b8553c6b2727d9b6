"""Tokenized, packed caches made offline by Apache Beam (seqio's cached-task path), read by
training.

A task registered with `TextCorpora.cache_seq_len = N` (or `packed_task_preprocessors`) tokenizes
*and packs* its documents into rows of N tokens before seqio's `CacheDatasetPlaceholder`: that is
the part Beam runs once, over every source file in parallel, and writes as TFRecords of rows
(inputs, targets, weights, positions, segment_ids, languages), globally shuffled. Training with
`DataConfig.use_cached = True` and the cache directory in `DataConfig.cache_dirs` then only reads
rows and mixes them (docs/data.md, "Preprocessing at scale").

    polylm-cache --gin_file=my_data.gin --cache_dir=gs://bucket/cache \
        --beam_option=--runner=DataflowRunner --beam_option=--project=... (or Spark, Flink)

runs `cache_tasks` with those options (DirectRunner by default, this machine's cores).
"""

from __future__ import annotations

import logging
import os
import re

import seqio
import tensorflow as tf

from polylm_jax import languages
from polylm_jax.data import documents, packing


def row_output_features(
  vocab: seqio.Vocabulary, language_set: languages.Languages = languages.DEFAULT
) -> dict[str, seqio.Feature]:
  """The features of a packed-row task: one row of every key per example."""
  ids = seqio.PassThroughVocabulary(2**31 - 1)
  features = {
    "inputs": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
    "targets": seqio.Feature(vocab, add_eos=False, dtype=tf.int32),
    "weights": seqio.Feature(ids, add_eos=False, dtype=tf.float32),
  }
  for key in ("positions", "segment_ids"):
    features[key] = seqio.Feature(ids, add_eos=False, dtype=tf.int32)
  features["languages"] = seqio.Feature(
    seqio.PassThroughVocabulary(language_set.slots), add_eos=False, dtype=tf.int32
  )
  return features


def packed_task_preprocessors(
  task: str,
  lang: str,
  records: documents.RecordFilter,
  seq_len: int,
  *,
  language_set: languages.Languages = languages.DEFAULT,
  parallel_blocks: int = 1,
) -> list:
  """Tokenize, pack into rows of seq_len (each source shard ends with one padded row), then the
  cache placeholder: everything Beam should do once. The tags come from `language_set`, held by
  the preprocessor itself, so Beam workers on other machines tag with the run's set."""

  return [
    documents.tokenize_records(
      task, lang, records, language_set=language_set, parallel_blocks=parallel_blocks
    ),
    lambda ds: packing.pack(ds, seq_len, flush=True),
    seqio.CacheDatasetPlaceholder(),
  ]


def is_packed(element_spec) -> bool:
  return all(k in element_spec for k in ("segment_ids", "positions", "weights"))


def check_row_length(task: str, rows: tf.data.Dataset, seq_len: int) -> None:
  """Packed rows must have the run's length; a cache does not record it, so read one row."""
  length = rows.element_spec["targets"].shape[0]
  if length is None:
    for row in rows.take(1):
      length = int(row["targets"].shape[0])
  if length is not None and length != seq_len:
    raise ValueError(
      f"task {task!r} holds packed rows of {length} tokens but DataConfig.seq_len="
      f"{seq_len}; re-cache it for this length or change seq_len"
    )


def cache_tasks(task_names, cache_dir: str, beam_options=()) -> list[str]:
  """Runs seqio's Beam preprocessing for each task's splits into cache_dir; returns the task
  directories written (each ends with a COMPLETED file, which seqio looks for)."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from seqio import beam_utils

  outputs = []
  with beam.Pipeline(options=PipelineOptions(list(beam_options))) as pipeline:
    for name in task_names:
      task = seqio.TaskRegistry.get(name)
      if not task.supports_caching:
        raise ValueError(
          f"task {name!r} has no CacheDatasetPlaceholder; register it with "
          f"TextCorpora.cache_seq_len to make it cacheable"
        )
      out = os.path.join(cache_dir, seqio.get_task_dir_from_name(name))
      logging.info("caching %s (%s) into %s", name, ", ".join(task.splits), out)
      done = []
      for split in task.splits:
        label = f"{name}_{split}"
        shards = beam_utils.PreprocessTask(task, split)
        rows = (
          pipeline
          | f"{label}_preprocess" >> shards
          # Shuffles the rows globally as it redistributes them: keep it.
          | f"{label}_shuffle" >> beam.Reshuffle()
        )
        num_shards = len(shards.shards)
        done.append(
          rows
          | f"{label}_write"
          >> beam_utils.WriteExampleTfRecord(
            seqio.get_cached_tfrecord_prefix(out, split), num_shards=num_shards
          )
        )
        done.append(
          rows
          | f"{label}_info" >> beam_utils.GetInfo(num_shards)
          | f"{label}_write_info" >> beam_utils.WriteJson(seqio.get_cached_info_path(out, split))
        )
        done.append(
          rows
          | f"{label}_stats" >> beam_utils.GetStats({"targets": task.output_features["targets"]})
          | f"{label}_write_stats" >> beam_utils.WriteJson(seqio.get_cached_stats_path(out, split))
        )
      _ = (
        done
        | f"{name}_all" >> beam.Flatten()
        | f"{name}_none" >> beam.Filter(lambda _: False)
        | f"{name}_completed"
        >> beam.io.textio.WriteToText(
          os.path.join(out, "COMPLETED"),
          append_trailing_newlines=False,
          num_shards=1,
          shard_name_template="",
        )
      )
      outputs.append(out)
  return outputs


def select_tasks(pattern: str) -> list[str]:
  """Registered tasks whose name fully matches the regex and that can be cached."""
  regex = re.compile(pattern)
  names = [
    n
    for n in seqio.TaskRegistry.names()
    if regex.fullmatch(n) and seqio.TaskRegistry.get(n).supports_caching
  ]
  if not names:
    raise ValueError(
      f"--tasks={pattern!r} matches no cacheable task (set "
      f"TextCorpora.cache_seq_len in the gin file to make corpora cacheable)"
    )
  return sorted(names)
