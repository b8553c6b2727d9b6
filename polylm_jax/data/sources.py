"""Your corpora as seqio tasks, from gin: one pretraining task per language over text or JSONL file
globs (local or any filesystem tf.io.gfile reads, `gs://` included) or a TFDS dataset (e.g. mC4's
per-language splits), and bilingual tasks over aligned parallel files.

Records that are not valid UTF-8 (or JSON), lack the text field, are empty, outside
[min_chars, max_chars] or below the language-id score are dropped, never crash the run, and are
counted per task and reason (`dropped_records()`; the trainer logs them).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import seqio
import tensorflow as tf

from polylm_jax import languages
from polylm_jax.data import cache, documents, tasks
from polylm_jax.typecheck import check_fields

dropped_records = documents.dropped_records
REASONS = documents.REASONS


def _claim(name: str, replace: bool) -> None:
  if name in seqio.TaskRegistry.names():
    if not replace:
      raise ValueError(f"task {name!r} is already registered (set replace=True to replace it)")
    seqio.TaskRegistry.remove(name)


def _check_globs(name: str, split: str, patterns) -> list[str]:
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  files = []
  for pattern in patterns:
    matched = sorted(tf.io.gfile.glob(pattern))
    if not matched:
      raise ValueError(f"task {name!r}: {split} pattern {pattern!r} matches no file")
    files += matched
  return files


@dataclasses.dataclass(frozen=True)
class TextCorpora:
  """gin: `train.corpora = @TextCorpora()`, then per language either files or a TFDS dataset:

      TextCorpora.files = {'th': {'train': 'gs://bucket/th/*.jsonl', 'validation': 'th_val.jsonl'}}
      TextCorpora.record_format = 'jsonl'        # or 'text': one document per line
      TextCorpora.lang_score_field = 'lang_score'  # optional language-id filter (JSONL/TFDS)
      TextCorpora.min_lang_score = 0.8
      TextCorpora.tfds = {'ko': {'name': 'c4/multilingual:3.1.0',
                                 'splits': {'train': 'ko', 'validation': 'ko-validation'}}}

  registers `<prefix><lang>` tasks before training (replacing the sample's of the same name)."""

  files: dict | None = None
  tfds: dict | None = None
  tfds_data_dir: str | None = None
  record_format: str = "text"  # for files: text | jsonl
  text_field: str = "text"
  lang_score_field: str | None = None
  min_lang_score: float = 0.0
  prefix: str = "polylm_pt_"
  min_chars: int = 1
  max_chars: int | None = None
  replace: bool = True  # replace an existing task of the same name (e.g. the sample's)
  shuffle_blocks: int = documents.SHUFFLE_BLOCKS  # per-task shuffle buffer, in 1024-document blocks
  parallel_blocks: int = 1  # blocks each task tokenizes at once (documents.tokenize_records)
  # Rows of this many tokens, packed before seqio's cache placeholder, so `polylm-cache` (Beam)
  # can tokenize and pack the corpora once (data/cache.py); None: plain document tasks.
  cache_seq_len: int | None = None

  def __post_init__(self):
    check_fields(self)

  def _filter(self, record_format: str) -> documents.RecordFilter:
    if self.lang_score_field and record_format == "text":
      raise ValueError(
        "TextCorpora.lang_score_field needs records with fields: set "
        "record_format='jsonl' (plain text lines carry no score)"
      )
    return documents.RecordFilter(
      record_format,
      self.text_field,
      self.lang_score_field,
      self.min_lang_score,
      self.min_chars,
      self.max_chars,
    )

  def _add(
    self, name: str, lang: str, source, records: documents.RecordFilter, vocab, language_set
  ) -> None:
    if self.cache_seq_len:  # packed rows, cacheable: shuffled per row, not per block
      features = cache.row_output_features(vocab, language_set)
      preprocessors = cache.packed_task_preprocessors(
        name,
        lang,
        records,
        self.cache_seq_len,
        language_set=language_set,
        parallel_blocks=self.parallel_blocks,
      )
      buffer = self.shuffle_blocks * documents.BLOCK_SIZE
    else:
      features = tasks.output_features(vocab, language_set=language_set)
      preprocessors = tasks.text_preprocessors(
        name, lang, records, language_set=language_set, parallel_blocks=self.parallel_blocks
      )
      buffer = self.shuffle_blocks
    _claim(name, self.replace)  # only now that the task is valid: a bad setting loses nothing
    documents.reset_dropped(name)
    seqio.TaskRegistry.add(
      name,
      source=source,
      output_features=features,
      preprocessors=preprocessors,
      shuffle_buffer_size=buffer,
    )

  def register(
    self,
    vocab: seqio.Vocabulary | None = None,
    language_set: languages.Languages = languages.DEFAULT,
  ) -> list[str]:
    """Registers a task per language, tagged with `language_set` (the run's)."""
    vocab = vocab or tasks.vocabulary()
    both = set(self.files or {}) & set(self.tfds or {})
    if both:
      raise ValueError(f"TextCorpora: languages {sorted(both)} are given both files and tfds")
    names = []
    for lang, splits in sorted((self.files or {}).items()):
      name = self.prefix + lang
      files = {split: _check_globs(name, split, p) for split, p in splits.items()}
      self._add(
        name,
        lang,
        seqio.TextLineDataSource(files),
        self._filter(self.record_format),
        vocab,
        language_set,
      )
      logging.info("registered %s over %s (%s records)", name, dict(splits), self.record_format)
      names.append(name)
    for lang, spec in sorted((self.tfds or {}).items()):
      name = self.prefix + lang
      if not isinstance(spec, dict) or "name" not in spec or "splits" not in spec:
        raise ValueError(
          f"TextCorpora.tfds[{lang!r}] must be {{'name': <tfds name:version>, "
          f"'splits': {{'train': <tfds split>, ...}}}}, got {spec!r}"
        )
      self._add(
        name,
        lang,
        seqio.TfdsDataSource(
          tfds_name=spec["name"], splits=dict(spec["splits"]), tfds_data_dir=self.tfds_data_dir
        ),
        self._filter("tfds"),
        vocab,
        language_set,
      )
      logging.info("registered %s over TFDS %s %s", name, spec["name"], dict(spec["splits"]))
      names.append(name)
    return names


_FIELDS = ("src", "tgt", "src_lang", "tgt_lang")


def _template_parts(template: str) -> list[str]:
  """'{src}\\n{tgt}' -> ['', '{src}', '\\n', '{tgt}', '']; unknown placeholders raise."""
  parts = re.split(r"(\{[a-z_]*\})", template)
  for p in parts[1::2]:
    if p[1:-1] not in _FIELDS:
      raise ValueError(
        f"BitextCorpora.template {template!r}: unknown placeholder {p}; use "
        f"{', '.join('{' + f + '}' for f in _FIELDS)}"
      )
  if "{src}" not in parts or "{tgt}" not in parts:
    raise ValueError(f"BitextCorpora.template {template!r} must contain {{src}} and {{tgt}}")
  return parts


@dataclasses.dataclass(frozen=True)
class BitextCorpora:
  """gin: `train.bitext = @BitextCorpora()`; aligned files, line i of one side translating
  line i of the other:

      BitextCorpora.pairs = {'en-th': {'train': ['para/en-th.en', 'para/en-th.th']}}
      BitextCorpora.template = '{src}\\n{tgt}'   # also {src_lang}, {tgt_lang}

  registers `<prefix><src>_<tgt>` (one document per pair, tagged with the non-English language).
  Globs are expanded and sorted on each side; both sides must list the same number of files."""

  pairs: dict | None = None
  template: str = tasks.BITEXT_TEMPLATE
  prefix: str = tasks.BITEXT_PREFIX
  replace: bool = True
  shuffle_blocks: int = documents.SHUFFLE_BLOCKS

  def __post_init__(self):
    check_fields(self)

  def register(
    self,
    vocab: seqio.Vocabulary | None = None,
    language_set: languages.Languages = languages.DEFAULT,
  ) -> list[str]:
    """Registers a task per pair, tagged with its non-English side in `language_set`."""
    vocab = vocab or tasks.vocabulary()
    parts = _template_parts(self.template)
    names = []
    for pair, splits in sorted((self.pairs or {}).items()):
      src, _, tgt = pair.partition("-")
      name = f"{self.prefix}{src}_{tgt}"
      if not (src and tgt):
        raise ValueError(f"BitextCorpora.pairs key {pair!r} must be '<src>-<tgt>', e.g. 'en-th'")
      files = {}
      for split, sides in splits.items():
        if isinstance(sides, str) or len(sides) != 2:
          raise ValueError(
            f"task {name!r}: {split} must be [source files, target files], got {sides!r}"
          )
        a, b = (_check_globs(name, split, side) for side in sides)
        if len(a) != len(b):
          raise ValueError(
            f"task {name!r}: {split} has {len(a)} source but {len(b)} target "
            f"files; the sides must align file by file"
          )
        files[split] = (a, b)
      preprocessors = tasks.text_preprocessors(
        name, tgt if src == "en" else src, language_set=language_set
      )
      _claim(name, self.replace)  # only now that the task is valid: a bad setting loses nothing
      seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(_bitext_fn(files, parts, src, tgt), splits=tuple(files)),
        preprocessors=preprocessors,
        output_features=tasks.output_features(vocab, language_set=language_set),
        shuffle_buffer_size=self.shuffle_blocks,
      )
      names.append(name)
    return names


def _bitext_fn(files: dict, parts: list[str], src_lang: str, tgt_lang: str):
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # aligned files are read in order; seqio shuffles the documents
    a, b = files[split]
    pairs = tf.data.Dataset.zip(tf.data.TextLineDataset(a), tf.data.TextLineDataset(b))
    constants = {"{src_lang}": src_lang, "{tgt_lang}": tgt_lang}

    def fmt(s, t):
      pieces = [
        s if p == "{src}" else t if p == "{tgt}" else constants.get(p, p) for p in parts if p
      ]
      return {"text": tf.strings.join(pieces)}

    return pairs.map(fmt)

  return dataset_fn
