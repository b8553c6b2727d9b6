"""The embedded sample corpus, its tokenizer, and packed seqio batches."""

import numpy as np
import pytest

from polylm_jax.data import sample, tokenizer


def test_sample_has_parallel_sentences_and_treebank_text_in_each_of_the_18_languages():
  assert len(sample.LANGUAGES) == 18
  for lang in sample.LANGUAGES:
    parallel, lines = sample.parallel_lines(lang), sample.sample_lines(lang)
    assert len(parallel) == 100 and lines[:100] == parallel, lang
    assert len(lines) >= 841, lang  # + 741-1,915 treebank sentences
    assert len(set(lines)) >= 0.99 * len(lines), f"{lang}: duplicate sentences"
    validation = sample.sample_lines(lang, "validation")
    assert len(validation) == (len(lines) + 9) // 10 and validation[:10] == parallel[::10]
    assert len(sample.sample_lines(lang, "train")) == len(lines) - len(validation)
  with pytest.raises(ValueError, match="not in the sample corpus"):
    sample.sample_path("xx")


def test_sample_tokenizer_conventions_and_round_trip():
  sp = tokenizer.load(sample.TOKENIZER_MODEL)
  assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
  assert [sp.id_to_piece(i) for i in sp.encode("2048")] == ["2", "0", "4", "8"]
  for lang in sample.LANGUAGES:
    for line in sample.sample_lines(lang):
      ids = sp.encode(line)
      assert 0 not in ids, (lang, line)  # byte fallback: never <unk>
      assert sp.decode(ids) == line
  odd = "  emoji 🧪🇹🇭, Ge'ez ሰላም, math ∮ x² dx\ttab  "
  assert sp.decode(sp.encode(odd)) == odd


def test_retraining_the_sample_tokenizer_is_deterministic(tmp_path):
  texts = {lang: sample.sample_lines(lang) for lang in ("en", "de", "ru")}
  a = tokenizer.train(texts, tmp_path / "a.model", 600, hard_vocab_limit=False)
  b = tokenizer.train(texts, tmp_path / "b.model", 600, hard_vocab_limit=False)
  assert open(a, "rb").read() == open(b, "rb").read()
  with pytest.raises(ValueError, match="weights"):
    tokenizer.train(texts, tmp_path / "c.model", 600, weights={"en": 0, "de": 0, "ru": 0})


@pytest.fixture(scope="module")
def pipeline():
  from polylm_jax.data import pipeline, tasks  # noqa: F401 (registers the tasks)

  return pipeline


def test_packed_batches_are_consistent(pipeline):
  """Rows are full (no padding in training), documents keep their own positions, BOS-started
  inputs, EOS and language; a document cut at a row end continues in a later row of its task."""
  cfg = pipeline.DataConfig(seq_len=64, batch_size=4, seed=1)
  sp = tokenizer.load(sample.TOKENIZER_MODEL)
  batch = next(pipeline.batches(cfg))
  assert set(batch) == {"inputs", "targets", "weights", "positions", "segment_ids", "languages"}
  assert batch["segment_ids"].max(axis=1).sum() > 4, "short sentences are packed several to a row"
  np.testing.assert_array_equal(batch["weights"], 1.0)
  for row in range(4):
    seg, pos = batch["segment_ids"][row], batch["positions"][row]
    inp, tgt = batch["inputs"][row], batch["targets"][row]
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(np.diff(seg) <= 1)
    tags = set(batch["languages"][row].tolist())
    assert len(tags) == 1, "a row holds one task's documents"
    lang = sample.LANGUAGES[tags.pop() - 1]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      np.testing.assert_array_equal(pos[idx], np.arange(len(idx)))
      np.testing.assert_array_equal(inp[idx[1:]], tgt[idx[:-1]])  # inputs are shifted targets
      whole_start, whole_end = s > 1, s < seg.max()
      if whole_start:
        assert inp[idx[0]] == 1  # a document starts from BOS
      if whole_end:
        assert tgt[idx[-1]] == 2  # ... and ends with EOS
      if whole_start and whole_end:
        assert sp.decode(tgt[idx[:-1]].tolist()) in sample.sample_lines(lang, "train")


def test_packing_cuts_long_documents_without_losing_tokens():
  import tensorflow as tf

  from polylm_jax.data import packing

  docs = [[5, 6, 7, 2], [8, 2], list(range(10, 19)) + [2], [20, 2]]
  ds = tf.data.Dataset.from_generator(
    lambda: ({"targets": np.array(d, np.int32)} for d in docs),
    output_signature={"targets": tf.TensorSpec([None], tf.int32)},
  )
  rows = list(packing.pack(ds, 4, docs_per_batch=3, flush=True).as_numpy_iterator())
  flat = np.concatenate([r["targets"][r["weights"] > 0] for r in rows])
  np.testing.assert_array_equal(flat, np.concatenate(docs))  # every token, in order, once
  assert [r["segment_ids"].tolist() for r in rows] == [
    [1, 1, 1, 1],
    [1, 1, 2, 2],
    [1, 1, 1, 1],
    [1, 1, 1, 1],
    [1, 1, 0, 0],
  ]
  assert [r["positions"].tolist() for r in rows] == [
    [0, 1, 2, 3],
    [0, 1, 0, 1],
    [0, 1, 2, 3],
    [0, 1, 2, 3],
    [0, 1, 0, 0],
  ]
  # Continuations of the long document (rows 2, 3) read their true previous tokens, not BOS.
  assert rows[1]["inputs"].tolist() == [1, 8, 1, 10]
  assert rows[2]["inputs"].tolist() == [11, 12, 13, 14]
  assert rows[3]["inputs"].tolist() == [15, 16, 17, 18]
  assert rows[4]["weights"].tolist() == [1, 1, 0, 0]


def test_same_seed_same_batches_other_seed_other_batches(pipeline):
  import seqio

  # A mixture of three of the sample's tasks (the seed drives both the shuffles and the mixing).
  rates = [("polylm_pt_en", 0.5), ("polylm_pt_de", 0.3), ("polylm_pt_th", 0.2)]
  seqio.MixtureRegistry.add("test_three_languages", rates)

  def first(seed, n=3):
    config = pipeline.DataConfig(
      mixture="test_three_languages", seq_len=64, batch_size=4, seed=seed
    )
    it = pipeline.batches(config)
    return [next(it)["targets"] for _ in range(n)]

  a, b, c = first(0), first(0), first(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not all(np.array_equal(x, z) for x, z in zip(a, c))


def test_unknown_mixture_and_indivisible_batch_fail(pipeline):
  with pytest.raises(ValueError, match="'no_such_mixture' is not a registered"):
    pipeline.packed_dataset(pipeline.DataConfig(mixture="no_such_mixture"))
  with pytest.raises(ValueError, match="batch_size=6 is not divisible by the 4"):
    pipeline.packed_dataset(pipeline.DataConfig(batch_size=6), num_shards=4)


def test_tokenizer_weights_must_name_known_languages(tmp_path):
  with pytest.raises(ValueError, match=r"no text: \['xx'\]"):
    tokenizer.train({"en": ["a b"]}, tmp_path / "x.model", 300, weights={"xx": 1.0})
