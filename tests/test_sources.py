"""Text-file corpora: tasks over globs, bad records dropped and counted, bad globs named."""

import numpy as np
import pytest
import seqio

from polylm_jax.data import pipeline, sample, sources, tokenizer


def test_file_corpus_trains_and_drops_bad_records(tmp_path):
  good = sample.sample_lines("pl", "train")[:12]
  raw = b"\n".join([g.encode() for g in good[:6]] + [b"\xff\xfe broken bytes", b"   ", b"ok",
                                                      b"x" * 500]
                   + [g.encode() for g in good[6:]]) + b"\n"
  (tmp_path / "pl_a.txt").write_bytes(raw)
  (tmp_path / "val_pl.txt").write_text("\n".join(sample.sample_lines("pl", "validation")), "utf-8")
  corpora = sources.TextCorpora(files={"pl": {"train": str(tmp_path / "pl_*.txt"),
                                              "validation": str(tmp_path / "val_pl.txt")}},
                                prefix="polylm_test_files_", min_chars=5, max_chars=300)
  assert corpora.register() == ["polylm_test_files_pl"]
  sp = tokenizer.load(sample.TOKENIZER_MODEL)
  config = pipeline.DataConfig(mixture="polylm_test_files_pl", seq_len=64, batch_size=2,
                               shuffle=False)
  docs = []
  for batch in pipeline.batches(config, num_epochs=1):
    for row in range(2):
      seg = batch["segment_ids"][row]
      docs += [sp.decode(batch["targets"][row][seg == s][:-1].tolist())
               for s in range(1, seg.max() + 1)]
      assert set(batch["languages"][row][seg > 0].tolist()) == {sample.LANGUAGES.index("pl") + 1}
  assert set(docs) <= set(good) and len(docs) >= 10
  assert sources.dropped_records()["polylm_test_files_pl"] == {
      "invalid_utf8": 1, "empty": 1, "too_short": 1, "too_long": 1}


def test_a_glob_that_matches_nothing_names_the_task_and_pattern(tmp_path):
  corpora = sources.TextCorpora(files={"th": {"train": str(tmp_path / "none/*.txt")}},
                                prefix="polylm_test_missing_")
  with pytest.raises(ValueError, match=r"task 'polylm_test_missing_th': train pattern "
                                       r"'.*none/\*\.txt' matches no file"):
    corpora.register()
  assert "polylm_test_missing_th" not in seqio.TaskRegistry.names()
