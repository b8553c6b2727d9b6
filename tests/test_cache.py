"""seqio's cached-task path: Beam (DirectRunner) tokenizes and packs once, training reads rows."""

import dataclasses
import json

import numpy as np
import pytest

from polylm_jax.data import pipeline, sample, sources, tokenizer
from polylm_jax.train import cache_cli

SP = tokenizer.load(sample.TOKENIZER_MODEL)


def test_beam_cache_is_what_training_reads(tmp_path):
  docs = sample.sample_lines("id", "train")
  for shard, part in enumerate((docs[:50], docs[50:])):  # two source shards
    (tmp_path / f"id-{shard}.jsonl").write_text(
      "\n".join(json.dumps({"text": d}) for d in part) + "\n", "utf-8"
    )
  (tmp_path / "id-val.jsonl").write_text(json.dumps({"text": docs[0]}) + "\n", "utf-8")
  (tmp_path / "data.gin").write_text(f"""
train.corpora = @TextCorpora()
TextCorpora.files = {{'id': {{'train': '{tmp_path}/id-?.jsonl',
                              'validation': '{tmp_path}/id-val.jsonl'}}}}
TextCorpora.record_format = 'jsonl'
TextCorpora.prefix = 'polylm_test_cached_'
TextCorpora.cache_seq_len = 64
""")
  cache_dir = tmp_path / "cache"
  written = cache_cli.main(
    [
      f"--gin_file={tmp_path / 'data.gin'}",
      f"--cache_dir={cache_dir}",
      "--tasks=polylm_test_cached_.*",
    ]
  )
  assert len(written) == 1 and (cache_dir / "polylm_test_cached_id" / "COMPLETED").exists()

  config = pipeline.DataConfig(
    mixture="polylm_test_cached_id",
    seq_len=64,
    batch_size=1,
    shuffle=False,
    use_cached=True,
    cache_dirs=(str(cache_dir),),
  )
  rows = list(pipeline.batches(config, num_epochs=1))
  # Every token of every document is in the cache exactly once (EOS included)...
  assert sum(int(r["weights"].sum()) for r in rows) == sum(len(t) + 1 for t in SP.encode(docs))
  # ... in rows packed as training packs them: documents whole between the row ends.
  inside = []
  for r in rows:
    seg, tgt = r["segment_ids"][0], r["targets"][0]
    for s in range(2, seg.max()):
      inside.append(SP.decode(tgt[seg == s][:-1].tolist()))
    np.testing.assert_array_equal(r["languages"][0][seg > 0], sample.LANGUAGES.index("id") + 1)
  assert inside and set(inside) <= set(docs)

  with pytest.raises(ValueError, match="rows of 64 tokens but DataConfig.seq_len=128"):
    next(pipeline.batches(dataclasses.replace(config, seq_len=128)))
  sources.TextCorpora(
    files={"id": {"train": str(tmp_path / "id-?.jsonl")}},
    record_format="jsonl",
    prefix="polylm_test_uncached_",
    cache_seq_len=64,
  ).register()
  with pytest.raises(ValueError, match="'polylm_test_uncached_id' has no completed cache"):
    next(pipeline.batches(dataclasses.replace(config, mixture="polylm_test_uncached_id")))
