"""Packing tokenized documents into fixed-length rows, in batches of documents (not one at a time).

A task's documents (`targets` = tokens + EOS, optionally a per-token `lang` tag) are concatenated
into one stream and cut into rows of `seq_len` tokens, GPT/Megatron style: no padding and no token
dropped, however long a document is. A document cut at a row end continues at the start of the
next row as a new segment (positions restart at 0; its first input is the true previous token).

Per row the train step gets `inputs` (BOS + targets shifted right, per document), `targets`,
`weights` (1 on tokens, 0 on padding), `positions`, `segment_ids` (1, 2, ... per row; 0 on
padding) and `languages` (the `lang` tags; 0 for untagged tasks and padding). Only a finite stream
(evaluation) ends with
a padded row: `flush=True` emits the remainder.

Why not seqio's packing: seqio's feature converters pack one example at a time in tf.data ops and
trim documents longer than a row; on short documents (sentences) that costs 20x more CPU than
tokenizing them (docs/benchmarks.md, "Data pipeline"). Here a batch of documents costs a handful of
vectorized ops.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from polylm_jax import framing

BOS_ID = framing.BOS_ID  # every document starts from BOS (framing.py: one decision)
ROW_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids", "languages")


def _empty_carry() -> dict[str, tf.Tensor]:
  return {
    "targets": tf.zeros([0], tf.int32),
    "inputs": tf.zeros([0], tf.int32),
    "doc": tf.zeros([0], tf.int64),
    "pos": tf.zeros([0], tf.int32),
    "lang": tf.zeros([0], tf.int32),
  }


def _stream(docs: dict[str, tf.RaggedTensor], first_doc: tf.Tensor) -> dict[str, tf.Tensor]:
  """Flat token stream of a batch of documents: targets, inputs, document id, position in doc.
  (Written in few graph ops: tf.data traces this for every task's pipeline at start.)"""
  targets = docs["targets"]
  splits = targets.row_splits
  flat = tf.cast(targets.flat_values, tf.int32)
  index = tf.range(tf.shape(flat, out_type=tf.int64)[0])
  # Each token's document: targets.value_rowids(), in one op.
  rowids = tf.searchsorted(splits[1:], index, side="right", out_type=tf.int64)
  pos = tf.cast(index - tf.gather(splits, rowids), tf.int32)
  previous = tf.concat([tf.constant([BOS_ID], tf.int32), flat[:-1]], axis=0)
  # Untagged documents: language 0 ("none") on every token.
  lang = tf.cast(docs["lang"].flat_values, tf.int32) if "lang" in docs else tf.zeros_like(flat)
  return {
    "targets": flat,
    "inputs": tf.where(pos == 0, BOS_ID, previous),
    "doc": rowids + first_doc,
    "pos": pos,
    "lang": lang,
  }


def _rows(stream: dict[str, tf.Tensor], seq_len: int, num_rows: tf.Tensor) -> dict[str, tf.Tensor]:
  """The first num_rows * seq_len stream tokens as rows (padding: doc -1)."""
  take = num_rows * seq_len
  cut = {k: tf.reshape(v[:take], [-1, seq_len]) for k, v in stream.items()}
  real = cut["doc"] >= 0
  seg = tf.cast(cut["doc"] - cut["doc"][:, :1] + 1, tf.int32)
  seg = tf.where(real, seg, 0)
  # A segment that began in an earlier row restarts its positions at this row's start.
  positions = tf.where(seg == 1, cut["pos"] - cut["pos"][:, :1], cut["pos"])
  return {
    "inputs": cut["inputs"],
    "targets": cut["targets"],
    "weights": tf.cast(real, tf.float32),
    "positions": tf.where(real, positions, 0),
    "segment_ids": seg,
    "languages": cut["lang"],
  }


def _pad(stream: dict[str, tf.Tensor], seq_len: int, last: tf.Tensor) -> dict[str, tf.Tensor]:
  """After the `last` element, pads the stream up to a whole row (padding tokens: 0, doc -1)."""
  short = (seq_len - tf.shape(stream["targets"])[0] % seq_len) % seq_len
  short = tf.where(last, short, 0)
  return {
    k: tf.concat([v, tf.fill([short], tf.constant(-1 if k == "doc" else 0, v.dtype))], 0)
    for k, v in stream.items()
  }


def pack(
  ds: tf.data.Dataset, seq_len: int, *, docs_per_batch: int = 1024, flush: bool = False
) -> tf.data.Dataset:
  """Rows of `seq_len` tokens (dicts of ROW_KEYS, [seq_len] each) from a dataset of documents
  ({"targets": [n] int, optionally "lang": [n] int}) or of document blocks (the same as ragged
  [docs, n]: documents.tokenize_records; much faster). `flush` pads and emits the final partial row
  (for finite datasets); an infinite stream never ends and needs none."""
  keys = [k for k in ("targets", "lang") if k in ds.element_spec]
  if ds.element_spec["targets"].shape.rank == 1:  # one document per element: batch them first
    ds = ds.map(lambda ex: {k: ex[k] for k in keys})
    ds = ds.filter(lambda ex: tf.size(ex["targets"]) > 0).ragged_batch(docs_per_batch)
    # Documents that all have one static length batch to dense tensors: make them ragged too.
    ds = ds.map(
      lambda b: {
        k: v if isinstance(v, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(v)
        for k, v in b.items()
      }
    )
  else:
    ds = ds.map(lambda b: {k: b[k] for k in keys})
  batches = ds.map(lambda b: (b, False))
  if flush:
    empty = {
      k: tf.RaggedTensor.from_row_splits(tf.zeros([0], spec.dtype), tf.zeros([1], tf.int64))
      for k, spec in ds.element_spec.items()
    }
    batches = batches.concatenate(tf.data.Dataset.from_tensors((empty, True)))

  def step(state, element):
    carry, next_doc = state
    docs, last = element
    new = _stream(docs, next_doc)
    stream = {k: tf.concat([carry[k], new[k]], 0) for k in carry}
    if flush:
      stream = _pad(stream, seq_len, last)
    num_rows = tf.shape(stream["targets"], out_type=tf.int64)[0] // seq_len
    rows = _rows(stream, seq_len, num_rows)
    rest = {k: v[num_rows * seq_len :] for k, v in stream.items()}
    return (rest, next_doc + docs["targets"].nrows()), rows

  initial = (_empty_carry(), tf.constant(0, tf.int64))
  return batches.scan(initial, step).unbatch()


def whole_documents(batches, eos_id: int = 2) -> list[list[int]]:
  """The documents (tokens without EOS) of consecutive batches of one task's rows, rejoined across
  row cuts; a trailing document with no EOS yet is left out. For inspecting and testing data."""
  stream = np.concatenate([b["targets"][b["weights"] > 0] for b in batches] or [np.zeros(0)])
  ends = np.flatnonzero(stream == eos_id)
  starts = np.concatenate([[0], ends[:-1] + 1])
  return [stream[s:e].tolist() for s, e in zip(starts, ends)]


def pack_examples(ds: tf.data.Dataset, seq_len: int) -> tf.data.Dataset:
  """Rows of whole examples (instruction tuning): blocks of documents {"targets", "loss_weights",
  "lang"} (ragged [docs, n], each at most seq_len tokens) become rows in which every example is a
  segment of its own, never cut across rows; `weights` are the examples' loss weights (0 on
  prompts), 0 on padding. Greedy in order, within each block (instructions.greedy_rows)."""
  from polylm_jax.data.instructions import greedy_rows

  def rows(targets, weights, langs, lengths):
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    plan = greedy_rows(lengths.tolist(), seq_len)
    out = {
      k: np.zeros((len(plan), seq_len), np.float32 if k == "weights" else np.int32)
      for k in ROW_KEYS
    }
    for r, docs in enumerate(plan):
      at = 0
      for s, d in enumerate(docs, start=1):
        a, b = bounds[d], bounds[d + 1]
        n = b - a
        if n > seq_len:
          raise ValueError(f"an example of {n} tokens does not fit a row of {seq_len}")
        out["targets"][r, at : at + n] = targets[a:b]
        out["inputs"][r, at] = BOS_ID
        out["inputs"][r, at + 1 : at + n] = targets[a : b - 1]
        out["weights"][r, at : at + n] = weights[a:b]
        out["positions"][r, at : at + n] = np.arange(n)
        out["segment_ids"][r, at : at + n] = s
        out["languages"][r, at : at + n] = langs[a:b]
        at += n
    return tuple(out[k] for k in ROW_KEYS)

  def block_rows(block):
    dtypes = [tf.float32 if k == "weights" else tf.int32 for k in ROW_KEYS]
    made = tf.numpy_function(
      rows,
      [
        block["targets"].flat_values,
        tf.cast(block["loss_weights"].flat_values, tf.float32),
        block["lang"].flat_values,
        block["targets"].row_lengths(),
      ],
      dtypes,
      stateful=False,
    )
    return {k: tf.ensure_shape(v, [None, seq_len]) for k, v in zip(ROW_KEYS, made)}

  return ds.map(block_rows).unbatch()
