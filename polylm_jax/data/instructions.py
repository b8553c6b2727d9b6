"""Instruction data (Alpaca / MultiAlpaca records) as seqio tasks, one per language.

    train.instructions = @InstructionCorpora()
    InstructionCorpora.directory = '/data/multialpaca'     # <dir>/<lang>.json or .jsonl
    InstructionCorpora.files = {'th': {'train': 'th_*.jsonl', 'validation': 'th_val.jsonl'}}
    DataConfig.mixture = 'polylm_sft'

A record is `{"instruction", "input", "output"}` (Alpaca) or `{"turns": [{"instruction",
"input", "output"}, ...]}` (a conversation); files are a JSON array or JSON lines. Each becomes a
document of BOS + turns formatted by `chat.InstructionFormat` (PolyLM-MultiAlpaca's
`"{instruction}\\n\\n"` by default) with loss weights 0 on prompt tokens and 1 on response tokens
and each turn's EOS. Records with a missing or empty instruction or output are skipped; a record
longer than the row (`DataConfig.seq_len`) is truncated, keeping the response where it can: first
its oldest turns go, then the start of its first remaining prompt (keeping `min_prompt_tokens`),
and only then the end of the response (whose EOS then goes too: a cut answer must not teach
stopping there). Skips and truncations are counted per language and logged at registration.
Examples are packed whole into rows (never split across rows), with segment ids, so no example
attends to another. `polylm_sft` mixes the languages in proportion to their examples (or by
temperature sampling, `temperature`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import pathlib
import random

import numpy as np
import seqio
import tensorflow as tf

from polylm_jax import chat, framing, languages
from polylm_jax.data import documents, tasks
from polylm_jax.typecheck import check_fields

SAMPLE_DIR = pathlib.Path(__file__).resolve().parent / "sft_sample"


def parse_record(raw) -> tuple[list[chat.Turn] | None, str | None]:
  """(turns, None) or (None, reason) for one record (a dict or its JSON text)."""
  if isinstance(raw, (bytes, str)):
    try:
      raw = json.loads(raw)
    except ValueError:
      return None, "invalid_json"
  if not isinstance(raw, dict):
    return None, "invalid_json"
  items = raw.get("turns") if "turns" in raw else [raw]
  if not isinstance(items, list) or not items:
    return None, "missing_field"
  turns = []
  for item in items:
    if not isinstance(item, dict):
      return None, "missing_field"
    instruction, output = item.get("instruction"), item.get("output")
    input_text = item.get("input", "") or ""
    if (
      not isinstance(instruction, str)
      or not isinstance(output, str)
      or not isinstance(input_text, str)
    ):
      return None, "missing_field"
    if not instruction.strip() or not output.strip():
      return None, "empty"
    turns.append(chat.Turn(instruction, output, input_text))
  return turns, None


def encode_example(
  sp, turns, fmt: chat.InstructionFormat, max_tokens: int, min_prompt_tokens: int = 8
) -> tuple[list[int], list[float], str | None]:
  """(ids, weights, truncation or None); ids start with BOS and hold at most max_tokens + 1."""
  parts = [(sp.encode(fmt.render(t.instruction, t.input)), sp.encode(t.output)) for t in turns]
  total = lambda ps: 1 + sum(len(p) + len(r) + 1 for p, r in ps)
  how = None
  while len(parts) > 1 and total(parts) > max_tokens + 1:
    parts, how = parts[1:], "dropped_turns"
  excess = total(parts) - (max_tokens + 1)
  prompt, response = parts[0]
  if excess > 0:
    cut = min(excess, max(0, len(prompt) - min_prompt_tokens))
    if cut:
      parts[0] = (prompt[cut:], response)
      excess, how = excess - cut, "truncated_prompt"
  ids, weights = [framing.BOS_ID], [0.0]
  for i, (prompt, response) in enumerate(parts):
    answer = response + [framing.EOS_ID]
    if excess > 0 and i == len(parts) - 1:  # the last answer loses its EOS and then its end
      answer = answer[: max(0, len(answer) - excess)]
      how = "truncated_response"
    ids += prompt + answer
    weights += [0.0] * len(prompt) + [1.0] * len(answer)
  return ids[: max_tokens + 1], weights[: max_tokens + 1], how


def tokenize_instructions(
  task: str,
  lang: str,
  fmt: chat.InstructionFormat,
  max_tokens: int,
  min_prompt_tokens: int = 8,
  block_size: int = 256,
  *,
  language_set: languages.Languages = languages.DEFAULT,
):
  """seqio preprocessor: serialized records -> blocks of examples {"targets", "loss_weights",
  "lang"} (ragged [examples, tokens]; targets exclude the leading BOS, which packing adds)."""

  def preprocess(ds: tf.data.Dataset, output_features) -> tf.data.Dataset:
    tag = language_set.tag(lang)
    sp = output_features["targets"].vocabulary.tokenizer

    def encode(raw: np.ndarray):
      targets, weights, lengths = [], [], []
      for record in raw.tolist():
        turns, reason = parse_record(record)
        if reason:
          documents.count_dropped(task, reason, record)
          continue
        ids, w, how = encode_example(sp, turns, fmt, max_tokens, min_prompt_tokens)
        if how:
          documents.count_dropped(task, how, record)
        targets += ids[1:]
        weights += w[1:]
        lengths.append(len(ids) - 1)
      return (
        np.asarray(targets, np.int32),
        np.asarray(weights, np.float32),
        np.asarray(lengths, np.int64),
      )

    def batch_fn(texts):
      t, w, n = tf.numpy_function(encode, [texts], [tf.int32, tf.float32, tf.int64], stateful=False)
      n = tf.ensure_shape(n, [None])
      docs = tf.RaggedTensor.from_row_lengths(tf.ensure_shape(t, [None]), n)
      return {
        "targets": docs,
        "loss_weights": tf.RaggedTensor.from_row_lengths(tf.ensure_shape(w, [None]), n),
        "lang": tf.ones_like(docs) * tag,
      }

    if isinstance(ds.element_spec, dict):
      ds = ds.map(lambda ex: ex["text"])
    return ds.batch(block_size).map(batch_fn)

  return preprocess


def output_features(
  vocab, language_set: languages.Languages = languages.DEFAULT
) -> dict[str, seqio.Feature]:
  features = tasks.output_features(vocab, language_set=language_set)
  features["loss_weights"] = seqio.Feature(
    seqio.PassThroughVocabulary(2), add_eos=False, dtype=tf.float32, rank=2
  )
  return features


def read_file(path: str) -> list[str]:
  """Serialized records of a JSON array or JSON-lines file (a line that is not JSON stays, to be
  skipped and counted as invalid_json)."""
  with tf.io.gfile.GFile(path, "r") as f:
    text = f.read()
  stripped = text.lstrip()
  if stripped.startswith("["):
    try:
      records = json.loads(stripped)
    except ValueError as e:
      raise ValueError(f"{path}: not a valid JSON array ({e})") from e
    return [json.dumps(r, ensure_ascii=False) for r in records]
  return [line for line in text.splitlines() if line.strip()]


def _holdout(record: str, fraction: float) -> bool:
  return int(hashlib.sha1(record.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


@dataclasses.dataclass(frozen=True)
class InstructionCorpora:
  """gin `train.instructions = @InstructionCorpora()`: registers `<prefix><lang>` tasks and the
  `mixture` over them before training (see the module docstring)."""

  files: dict | None = None  # {lang: glob or {split: glob}}
  directory: str | None = None  # or: <directory>/<file_pattern> for each language of the run
  embedded_sample: bool = False  # or: the package's small translation set (sft_sample/)
  file_pattern: str = "{lang}.json*"
  format: chat.InstructionFormat = chat.InstructionFormat()
  prefix: str = "polylm_sft_"
  mixture: str = "polylm_sft"
  temperature: float | None = None  # None: rates proportional to examples; else n ** temperature
  holdout_fraction: float = 0.02  # validation split (by record hash) where no validation files
  min_prompt_tokens: int = 8
  seed: int = 0

  def __post_init__(self):
    check_fields(self)
    if not self.files and not self.directory and not self.embedded_sample:
      raise ValueError("InstructionCorpora: set files, directory or embedded_sample")
    if not 0.0 <= self.holdout_fraction < 1.0:
      raise ValueError(
        f"InstructionCorpora.holdout_fraction={self.holdout_fraction} must be in [0, 1)"
      )

  def _globs(self, language_set: languages.Languages) -> dict[str, dict[str, str]]:
    out = {}
    for lang, spec in (self.files or {}).items():
      out[lang] = {"train": spec} if isinstance(spec, str) else dict(spec)
    directory = str(SAMPLE_DIR) if self.embedded_sample else self.directory
    if directory:
      for lang in language_set.codes:
        pattern = f"{directory.rstrip('/')}/{self.file_pattern.format(lang=lang)}"
        if lang not in out and tf.io.gfile.glob(pattern):
          out[lang] = {"train": pattern}
      if not out:
        raise ValueError(
          f"InstructionCorpora.directory={directory!r}: no file matches "
          f"{self.file_pattern!r} for any of the run's languages "
          f"{list(language_set.codes)}"
        )
    return out

  def register(
    self, vocab=None, seq_len: int = 2048, language_set: languages.Languages = languages.DEFAULT
  ) -> dict[str, dict]:
    """Registers the tasks and the mixture, tagged with `language_set` (the run's); returns
    per-language statistics (also logged)."""
    vocab = vocab or tasks.vocabulary()
    sp = vocab.tokenizer
    stats, rates = {}, {}
    for lang, splits in sorted(self._globs(language_set).items()):
      name = self.prefix + lang
      records = {}
      for split, pattern in splits.items():
        paths = sorted(tf.io.gfile.glob(pattern))
        if not paths:
          raise ValueError(f"task {name!r}: {split} pattern {pattern!r} matches no file")
        records[split] = [r for p in paths for r in read_file(p)]
      if "validation" not in records and self.holdout_fraction:
        all_train = records["train"]
        records["train"] = [r for r in all_train if not _holdout(r, self.holdout_fraction)]
        records["validation"] = [r for r in all_train if _holdout(r, self.holdout_fraction)]
      random.Random(f"{self.seed}/{lang}").shuffle(records["train"])  # mix blocks, fixed order
      stats[lang] = self._statistics(sp, records, seq_len)
      if not stats[lang]["train_examples"]:
        raise ValueError(
          f"task {name!r}: no usable training example in {splits} "
          f"(skipped: {stats[lang]['skipped']})"
        )
      documents.reset_dropped(name)
      if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
      seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
          _records_fn(records),
          splits=tuple(records),
          num_input_examples={s: len(r) for s, r in records.items()},
        ),
        preprocessors=[
          tokenize_instructions(
            name, lang, self.format, seq_len, self.min_prompt_tokens, language_set=language_set
          )
        ],
        output_features=output_features(vocab, language_set),
        shuffle_buffer_size=64,
      )
      n = stats[lang]["train_examples"]
      rates[name] = float(n) if self.temperature is None else float(n) ** self.temperature
    if self.mixture in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(self.mixture)
    seqio.MixtureRegistry.add(self.mixture, list(rates.items()))
    total = sum(rates.values())
    for lang, s in stats.items():
      logging.info(
        "instructions %s: %d train / %d validation examples, %d packed rows per epoch, "
        "rate %.1f%%; skipped %s; truncated %s",
        lang,
        s["train_examples"],
        s["validation_examples"],
        s["rows"],
        100 * rates[self.prefix + lang] / total,
        s["skipped"] or "none",
        s["truncated"] or "none",
      )
    return stats

  def _statistics(self, sp, records, seq_len: int) -> dict:
    skipped: collections.Counter = collections.Counter()
    truncated: collections.Counter = collections.Counter()
    lengths: list[int] = []
    for record in records["train"]:
      turns, reason = parse_record(record)
      if reason:
        skipped[reason] += 1
        continue
      ids, _, how = encode_example(sp, turns, self.format, seq_len, self.min_prompt_tokens)
      if how:
        truncated[how] += 1
      lengths.append(len(ids) - 1)
    valid = sum(parse_record(r)[1] is None for r in records.get("validation", []))
    return {
      "train_examples": len(lengths),
      "validation_examples": valid,
      "rows": rows_per_epoch(lengths, seq_len),
      "skipped": dict(skipped),
      "truncated": dict(truncated),
    }


def _records_fn(records: dict[str, list[str]]):
  def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # the order is fixed at registration; seqio shuffles the blocks
    return tf.data.Dataset.from_tensor_slices({"text": records[split]})

  return dataset_fn


def rows_per_epoch(lengths, seq_len: int, block_size: int = 256) -> int:
  """Rows that packing makes of examples of these lengths (whole examples, block by block)."""
  rows = 0
  for start in range(0, len(lengths), block_size):
    rows += len(greedy_rows(lengths[start : start + block_size], seq_len))
  return rows


def greedy_rows(lengths, seq_len: int) -> list[list[int]]:
  """Example indices per row: in order, a new row when the next example does not fit."""
  rows: list[list[int]] = []
  current: list[int] = []
  used = 0
  for i, n in enumerate(lengths):
    if current and used + n > seq_len:
      rows.append(current)
      current, used = [], 0
    current.append(i)
    used += n
  if current:
    rows.append(current)
  return rows


def steps_for_epochs(stats: dict[str, dict], epochs: float, batch_size: int) -> int:
  return max(1, math.ceil(epochs * sum(s["rows"] for s in stats.values()) / batch_size))


def dropped_counts(task: str) -> dict[str, int]:
  """Records skipped and truncated while this process read `task` (per pass over the data)."""
  return documents.dropped_records().get(task, {})
