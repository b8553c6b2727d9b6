"""From raw records to tokenized documents, a batch of records at a time.

One preprocessor does what would otherwise be five per-record tf.data steps (parse, filter,
tokenize, EOS, language tag): records are batched, handed to SentencePiece's batch encoder in one
call, and unbatched. Per-record tf.data steps cost more CPU than tokenizing a sentence
(docs/benchmarks.md, "Data pipeline").

Records are plain text lines (`record_format="text"`), JSON lines (`"jsonl"`: the text in
`text_field`, optionally a language-id score in `lang_score_field` kept only if >=
`min_lang_score`), or dicts from a TFDS dataset (`"tfds"`: `text_field` of each example).
Records that cannot be used are dropped and counted per task and reason, never crash the run:
invalid UTF-8, invalid JSON, missing field, empty, too short, too long, low language-id score.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
import logging
import threading

import numpy as np
import tensorflow as tf

from polylm_jax import languages
from polylm_jax.typecheck import check_fields

REASONS = (
  "invalid_utf8",
  "invalid_json",
  "missing_field",
  "empty",
  "too_short",
  "too_long",
  "low_lang_score",
)
_DROPPED: collections.Counter = collections.Counter()
_SEEN: dict[tuple[str, str], set[int]] = {}  # (task, reason) -> the dropped records' hashes
_LOCK = threading.Lock()


def count_dropped(task: str, reason: str, record: bytes | str) -> None:
  """Counts a dropped record once, however often it is read again (every epoch, stream and
  evaluation pass reads it anew), and says so the first time a task drops a record for a reason
  (the totals are logged when the run ends)."""
  key = hash(record)
  with _LOCK:
    seen = _SEEN.setdefault((task, reason), set())
    if key in seen:
      return
    seen.add(key)
    _DROPPED[(task, reason)] += 1
    first = _DROPPED[(task, reason)] == 1
  if first:
    logging.warning(
      "data: task %s dropped a record (%s): %.200r; distinct records dropped are counted and "
      "logged when the run ends",
      task,
      reason,
      record,
    )


def dropped_records() -> dict[str, dict[str, int]]:
  """{task: {reason: count}} of records dropped so far in this process."""
  out: dict[str, dict[str, int]] = {}
  with _LOCK:
    for (task, reason), n in sorted(_DROPPED.items()):
      if n:
        out.setdefault(task, {})[reason] = n
  return out


def reset_dropped(task: str) -> None:
  """Forgets a task's counts (it is being registered anew: its counts start from zero)."""
  with _LOCK:
    for key in [k for k in _DROPPED if k[0] == task]:
      del _DROPPED[key]
      _SEEN.pop(key, None)


@dataclasses.dataclass(frozen=True)
class RecordFilter:
  """How records become document texts, and which are kept."""

  record_format: str = "text"  # text | jsonl | tfds
  text_field: str = "text"
  lang_score_field: str | None = None
  min_lang_score: float = 0.0
  min_chars: int = 1
  max_chars: int | None = None

  def __post_init__(self):
    check_fields(self)
    if self.record_format not in ("text", "jsonl", "tfds"):
      raise ValueError(f"record_format={self.record_format!r}: expected text, jsonl or tfds")

  def texts(self, task: str, records) -> list[bytes]:
    """UTF-8 texts of the usable records; the others counted in dropped_records()."""
    kept: list[bytes] = []
    for raw in records:
      reason = None
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        reason = "invalid_utf8"
      if reason is None and self.record_format == "jsonl":
        text, reason = self._from_json(text)
      if reason is None:
        chars = len(text)
        if not text.strip():
          reason = "empty"
        elif chars < self.min_chars:
          reason = "too_short"
        elif self.max_chars and chars > self.max_chars:
          reason = "too_long"
      if reason is None:
        kept.append(text.encode("utf-8") if self.record_format == "jsonl" else raw)
      else:
        count_dropped(task, reason, raw)
    return kept

  def _from_json(self, line: str) -> tuple[str, str | None]:
    try:
      record = json.loads(line)
    except ValueError:
      return "", "invalid_json"
    if not isinstance(record, dict) or not isinstance(record.get(self.text_field), str):
      return "", "missing_field"
    if self.lang_score_field:
      score = record.get(self.lang_score_field)
      if not isinstance(score, (int, float)):
        return "", "missing_field"
      if score < self.min_lang_score:
        return "", "low_lang_score"
    return record[self.text_field], None


BLOCK_SIZE = 1024  # records per document block
# seqio shuffles a task's elements in a buffer of this many: here blocks, i.e. 8 x 1024 = 8192
# documents per task (seqio's default of 1000 would hold 1,024,000 documents per task in memory).
SHUFFLE_BLOCKS = 8


def tokenize_records(
  task: str,
  language: str,
  records: RecordFilter = RecordFilter(),
  *,
  language_set: languages.Languages = languages.DEFAULT,
  block_size: int = BLOCK_SIZE,
  parallel_blocks: int = 1,
):
  """seqio preprocessor: records (`text`, a tf.string per record) -> document blocks: each
  element holds up to `block_size` documents as ragged [docs, tokens] features {"targets":
  tokens + EOS, "lang": the language tag per token} (declare them with rank 2, see
  tasks.output_features). Blocks, not single documents, because every per-element tf.data step
  costs more CPU than tokenizing a sentence; packing.pack takes blocks as they are.
  `parallel_blocks`: blocks tokenized at once. 1 suits a mixture of many tasks (each task's
  pipeline already runs beside the others, and more threads per task cost more CPU per token:
  docs/benchmarks.md); raise it when one task must feed a many-core host alone."""

  def preprocess(ds: tf.data.Dataset, output_features) -> tf.data.Dataset:
    # Looked up when the dataset is built: a registered task no run reads never asks.
    language_tag = language_set.tag(language)
    vocab = output_features["targets"].vocabulary
    sp = vocab.tokenizer  # the sentencepiece processor of vocab's model
    if vocab.eos_id != sp.eos_id() or sp.eos_id() < 0:
      raise ValueError(
        f"task {task!r}: the vocabulary's EOS id {vocab.eos_id} is not its "
        f"SentencePiece model's ({sp.eos_id()})"
      )

    def encode(raw: np.ndarray):
      texts = records.texts(task, raw.tolist())
      # One thread: tf.data already encodes several blocks at once. SentencePiece appends EOS.
      ids = sp.encode(texts, num_threads=1, add_eos=True) if texts else []
      lengths = np.fromiter(map(len, ids), np.int64, len(ids))
      flat = np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum()))
      return flat, lengths

    def batch_fn(texts):
      flat, lengths = tf.numpy_function(encode, [texts], [tf.int32, tf.int64], stateful=False)
      docs = tf.RaggedTensor.from_row_lengths(
        tf.ensure_shape(flat, [None]), tf.ensure_shape(lengths, [None])
      )
      return {"targets": docs, "lang": tf.ones_like(docs) * language_tag}

    if isinstance(ds.element_spec, dict):  # e.g. {"text": ...} from TFDS or a FunctionDataSource
      field = records.text_field if records.record_format == "tfds" else "text"
      if field not in ds.element_spec:
        raise ValueError(
          f"task {task!r}: records have no field {field!r} (fields: "
          f"{sorted(ds.element_spec)}); set the text field"
        )
      ds = ds.map(lambda ex: ex[field])
    return ds.batch(block_size).map(
      batch_fn, num_parallel_calls=None if parallel_blocks == 1 else parallel_blocks
    )

  return preprocess
