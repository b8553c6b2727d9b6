"""Text-file corpora: tasks over globs, bad records dropped and counted, bad globs named."""

import numpy as np
import pytest
import seqio

from polylm_jax.data import packing, pipeline, sample, sources, tokenizer


def test_file_corpus_trains_and_drops_bad_records(tmp_path):
  good = sample.sample_lines("pl", "train")[:12]
  raw = (
    b"\n".join(
      [g.encode() for g in good[:6]]
      + [b"\xff\xfe broken bytes", b"   ", b"ok", b"x" * 500]
      + [g.encode() for g in good[6:]]
    )
    + b"\n"
  )
  (tmp_path / "pl_a.txt").write_bytes(raw)
  (tmp_path / "val_pl.txt").write_text("\n".join(sample.sample_lines("pl", "validation")), "utf-8")
  corpora = sources.TextCorpora(
    files={"pl": {"train": str(tmp_path / "pl_*.txt"), "validation": str(tmp_path / "val_pl.txt")}},
    prefix="polylm_test_files_",
    min_chars=5,
    max_chars=300,
  )
  assert corpora.register() == ["polylm_test_files_pl"]
  sp = tokenizer.load(sample.TOKENIZER_MODEL)
  config = pipeline.DataConfig(
    mixture="polylm_test_files_pl", seq_len=64, batch_size=2, shuffle=False
  )
  batches = list(pipeline.batches(config, num_epochs=1))
  for batch in batches:
    assert set(batch["languages"][batch["weights"] > 0].tolist()) == {
      sample.LANGUAGES.index("pl") + 1
    }
  docs = [sp.decode(d) for d in packing.whole_documents(batches)]
  assert set(docs) <= set(good) and len(docs) >= 10
  assert sources.dropped_records()["polylm_test_files_pl"] == {
    "invalid_utf8": 1,
    "empty": 1,
    "too_short": 1,
    "too_long": 1,
  }


def test_a_glob_that_matches_nothing_names_the_task_and_pattern(tmp_path):
  corpora = sources.TextCorpora(
    files={"th": {"train": str(tmp_path / "none/*.txt")}}, prefix="polylm_test_missing_"
  )
  with pytest.raises(
    ValueError,
    match=r"task 'polylm_test_missing_th': train pattern "
    r"'.*none/\*\.txt' matches no file",
  ):
    corpora.register()
  assert "polylm_test_missing_th" not in seqio.TaskRegistry.names()


def _documents(mixture):
  config = pipeline.DataConfig(mixture=mixture, seq_len=64, batch_size=1, shuffle=False)
  batches = list(pipeline.batches(config, num_epochs=1))
  return batches, [SP.decode(d) for d in packing.whole_documents(batches)]


SP = tokenizer.load(sample.TOKENIZER_MODEL)


def test_jsonl_corpus_filters_on_the_language_id_score(tmp_path):
  import json

  good = sample.sample_lines("th", "train")[:8]
  lines = [json.dumps({"text": t, "lang_score": 0.95}, ensure_ascii=False) for t in good[:4]]
  lines += [
    json.dumps({"text": good[4], "lang_score": 0.2}, ensure_ascii=False),  # low score
    '{"text": "truncated',  # invalid JSON
    json.dumps({"body": good[5], "lang_score": 0.9}),  # no text field
    json.dumps({"text": good[6]}),
  ]  # no score field
  lines += [json.dumps({"text": t, "lang_score": 1}, ensure_ascii=False) for t in good[7:]]
  (tmp_path / "th.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
  corpora = sources.TextCorpora(
    files={"th": {"train": str(tmp_path / "*.jsonl")}},
    record_format="jsonl",
    lang_score_field="lang_score",
    min_lang_score=0.5,
    prefix="polylm_test_jsonl_",
  )
  assert corpora.register() == ["polylm_test_jsonl_th"]
  batches, docs = _documents("polylm_test_jsonl_th")
  assert sorted(docs) == sorted(good[:4] + good[7:])
  expected = {"low_lang_score": 1, "invalid_json": 1, "missing_field": 2}
  assert sources.dropped_records()["polylm_test_jsonl_th"] == expected
  _documents("polylm_test_jsonl_th")  # read again (another epoch): the same records, not more
  assert sources.dropped_records()["polylm_test_jsonl_th"] == expected
  with pytest.raises(ValueError, match="lang_score_field needs records with fields"):
    sources.TextCorpora(
      files={"th": {"train": str(tmp_path / "*.jsonl")}}, lang_score_field="lang_score"
    ).register()
  assert "polylm_pt_th" in seqio.TaskRegistry.names()  # the refused setting replaced nothing


def test_tfds_corpus_reads_a_prepared_dataset_offline(tmp_path):
  import tensorflow_datasets as tfds

  lines = {
    "ko": sample.sample_lines("ko", "train")[:10],
    "ko-validation": sample.sample_lines("ko", "validation")[:3],
  }

  class PolylmTestText(tfds.core.GeneratorBasedBuilder):
    """mC4-shaped: {"text", "url"} per example, one split per language."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "url": tfds.features.Text()}
        ),
      )

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(texts) for split, texts in lines.items()}

    def _generate_examples(self, texts):
      for i, text in enumerate(texts):
        yield i, {"text": text, "url": f"https://example.com/{i}"}

  PolylmTestText(data_dir=str(tmp_path)).download_and_prepare()
  corpora = sources.TextCorpora(
    tfds={
      "ko": {
        "name": "polylm_test_text:1.0.0",
        "splits": {"train": "ko", "validation": "ko-validation"},
      }
    },
    tfds_data_dir=str(tmp_path),
    prefix="polylm_test_tfds_",
  )
  assert corpora.register() == ["polylm_test_tfds_ko"]
  _, docs = _documents("polylm_test_tfds_ko")
  assert sorted(docs) == sorted(lines["ko"])
  with pytest.raises(ValueError, match=r"TextCorpora.tfds\['ko'\] must be"):
    sources.TextCorpora(tfds={"ko": "c4/multilingual"}).register()


def test_bitext_from_aligned_files(tmp_path):
  src, tgt = sample.sample_lines("en", "train")[:6], sample.sample_lines("vi", "train")[:6]
  (tmp_path / "p.en").write_text("\n".join(src) + "\n", "utf-8")
  (tmp_path / "p.vi").write_text("\n".join(tgt) + "\n", "utf-8")
  bitext = sources.BitextCorpora(
    pairs={"en-vi": {"train": [str(tmp_path / "*.en"), str(tmp_path / "*.vi")]}},
    template="[{src_lang}] {src} [{tgt_lang}] {tgt}",
    prefix="polylm_test_files_bitext_",
  )
  assert bitext.register() == ["polylm_test_files_bitext_en_vi"]
  batches, docs = _documents("polylm_test_files_bitext_en_vi")
  assert docs == [f"[en] {a} [vi] {b}" for a, b in zip(src, tgt)]
  tags = np.unique(np.concatenate([b["languages"][b["weights"] > 0] for b in batches]))
  assert tags.tolist() == [sample.LANGUAGES.index("vi") + 1]  # tagged with the non-English side
  with pytest.raises(ValueError, match="unknown placeholder {source}"):
    sources.BitextCorpora(pairs={"en-vi": {}}, template="{source} {tgt}").register()
  with pytest.raises(ValueError, match="has 1 source but 0 target files|matches no file"):
    sources.BitextCorpora(
      pairs={"en-vi": {"train": [str(tmp_path / "*.en"), str(tmp_path / "*.xx")]}}
    ).register()
