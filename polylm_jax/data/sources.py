"""Pretraining corpora from text files: one task per language over file globs (local or any
filesystem tf.io.gfile reads, `gs://` included), one document per line.

Records that are not valid UTF-8, empty, or outside [min_chars, max_chars] are dropped, never
crash the run, and are counted per task and reason (`dropped_records()`; the trainer logs them).
"""

from __future__ import annotations

import dataclasses
import logging

import seqio
import tensorflow as tf

from polylm_jax.data import tasks

_DROPPED: dict[tuple[str, str], tf.Variable] = {}
REASONS = ("invalid_utf8", "empty", "too_short", "too_long")


def _counter(task: str, reason: str) -> tf.Variable:
  key = (task, reason)
  if key not in _DROPPED:
    _DROPPED[key] = tf.Variable(0, dtype=tf.int64, trainable=False, name=f"dropped_{reason}")
  return _DROPPED[key]


def dropped_records() -> dict[str, dict[str, int]]:
  out: dict[str, dict[str, int]] = {}
  for (task, reason), var in _DROPPED.items():
    if int(var.numpy()):
      out.setdefault(task, {})[reason] = int(var.numpy())
  return out


def clean_text(task: str, min_chars: int, max_chars: int | None):
  """Preprocessor: drop (and count) invalid-UTF-8, empty, too short and too long records."""
  counters = {r: _counter(task, r) for r in REASONS}

  def keep(ex):
    text = ex["text"]
    valid = tf.equal(tf.strings.unicode_transcode(text, "UTF-8", "UTF-8", errors="ignore"), text)
    safe = tf.where(valid, text, "")
    chars = tf.strings.length(safe, unit="UTF8_CHAR")
    empty = valid & tf.equal(tf.strings.length(tf.strings.strip(safe)), 0)
    short = valid & ~empty & (chars < min_chars)
    long = valid & (chars > max_chars) if max_chars else tf.constant(False)
    for reason, flag in (("invalid_utf8", ~valid), ("empty", empty), ("too_short", short),
                         ("too_long", long)):
      counters[reason].assign_add(tf.cast(flag, tf.int64))
    return valid & ~empty & ~short & ~long

  def fn(ds):
    return ds.filter(keep)
  return fn


@dataclasses.dataclass(frozen=True)
class TextCorpora:
  """gin: `train.corpora = @TextCorpora()`; `TextCorpora.files = {'th': {'train': 'th/*.txt',
  'validation': 'th_val.txt'}, ...}` registers `<prefix><lang>` tasks before training."""

  files: dict | None = None
  prefix: str = "polylm_pt_"
  min_chars: int = 1
  max_chars: int | None = None
  replace: bool = True  # replace an existing task of the same name (e.g. the sample's)

  def register(self, vocab: seqio.Vocabulary | None = None) -> list[str]:
    vocab = vocab or tasks.vocabulary()
    names = []
    for lang, splits in sorted((self.files or {}).items()):
      name = self.prefix + lang
      for split, pattern in splits.items():
        if not tf.io.gfile.glob(pattern):
          raise ValueError(f"task {name!r}: {split} pattern {pattern!r} matches no file")
      if name in seqio.TaskRegistry.names():
        if not self.replace:
          raise ValueError(f"task {name!r} is already registered (TextCorpora.replace=False)")
        seqio.TaskRegistry.remove(name)
      seqio.TaskRegistry.add(
          name,
          source=seqio.TextLineDataSource(dict(splits)),
          preprocessors=[
              lambda ds: ds.map(lambda line: {"text": line}),
              clean_text(name, self.min_chars, self.max_chars),
              *tasks.text_preprocessors(lang),
          ],
          output_features=tasks.output_features(vocab))
      logging.info("registered %s over %s", name, dict(splits))
      names.append(name)
    return names
