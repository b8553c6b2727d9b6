"""Data pipeline throughput, in one run on the same text (../shared/data/ud_text when present,
else the embedded sample), all with the same SentencePiece model:

1. raw SentencePiece encode (python list API, one thread): the limit;
2. this pipeline end to end (read files, drop bad records, tokenize, tag, pack, mix 18 languages,
   batch), tokens per CPU-second of the process (tf.data runs several threads);
3. reading an already-tokenized, packed cache (written once with tf.data's `Dataset.save`).

Goals (data issue): 2 >= 50% of 1 per core; 3 >= 1M tokens/s per core.

  python bench/data_pipeline.py [--batches 200]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import shutil
import tempfile
import time

import numpy as np

UD = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "ud_text"


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf
  from polylm_jax.data import pipeline, sample, sources, tokenizer
  from polylm_jax.data.curriculum import Curriculum, Stage

  if UD.is_dir():
    files = {p.stem: str(p) for p in sorted(UD.glob("*.txt"))}
    corpus = f"ud_text ({UD})"
  else:
    files = {lang: str(sample.sample_path(lang)) for lang in sample.LANGUAGES}
    corpus = "embedded sample"
  lines = [l for path in files.values() for l in pathlib.Path(path).read_text("utf-8").splitlines()]
  sp = tokenizer.load(sample.TOKENIZER_MODEL)
  # 1. raw encode, one thread.
  reps = max(1, 200_000 // max(len(lines), 1))
  t, c = time.perf_counter(), cpu_seconds()
  raw_tokens = sum(len(ids) for _ in range(reps) for ids in sp.encode(lines, num_threads=1))
  raw_wall, raw_cpu = time.perf_counter() - t, cpu_seconds() - c
  raw_rate = raw_tokens / raw_cpu
  # 2. end to end.
  sources.TextCorpora(files={k: {"train": v} for k, v in files.items()},
                      prefix="bench_pt_").register()
  curriculum = Curriculum(stages=(Stage(rates={f"bench_pt_{k}": 1.0 for k in files}),))
  config = pipeline.DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
  batches = pipeline.StagedBatches(curriculum, config)
  next(batches)  # build the graph, fill the shuffle buffer
  t, c = time.perf_counter(), cpu_seconds()
  tokens = 0
  for _ in range(args.batches):
    tokens += int(next(batches)["weights"].sum())
  e2e_wall, e2e_cpu = time.perf_counter() - t, cpu_seconds() - c
  e2e_rate = tokens / e2e_cpu
  # 3. cached: the same packed rows, tokenized once and saved.
  cache = tempfile.mkdtemp()
  ds = pipeline.packed_dataset(dataclasses_replace(config, mixture=batches.mixtures[0]))
  ds.take(args.batches).save(cache)
  loaded = tf.data.Dataset.load(cache)
  t, c = time.perf_counter(), cpu_seconds()
  cached_tokens = 0
  for _ in range(3):
    for raw in loaded:
      cached_tokens += int(np.asarray(raw["decoder_loss_weights"]).sum())
  cached_wall, cached_cpu = time.perf_counter() - t, cpu_seconds() - c
  shutil.rmtree(cache)
  cached_rate = cached_tokens / cached_cpu
  print(f"machine: {os.cpu_count()} cores; corpus: {corpus}, {len(lines)} lines, 18 languages; "
        f"tokenizer: sample_sp.model ({sp.vocab_size()} pieces); rows {args.batch_size} x "
        f"{args.seq_len}")
  print(f"1. raw SentencePiece encode  : {raw_rate / 1e6:6.2f} M tokens per CPU-second "
        f"({raw_tokens / raw_wall / 1e6:.2f} M/s wall)")
  print(f"2. pipeline end to end       : {e2e_rate / 1e6:6.2f} M tokens per CPU-second "
        f"({tokens / e2e_wall / 1e6:.2f} M/s wall) = {e2e_rate / raw_rate:.0%} of raw encode "
        f"(goal >= 50%)")
  print(f"3. tokenized cache, read     : {cached_rate / 1e6:6.2f} M tokens per CPU-second "
        f"({cached_tokens / cached_wall / 1e6:.2f} M/s wall) (goal >= 1 M per core)")


def dataclasses_replace(obj, **kw):
  import dataclasses
  return dataclasses.replace(obj, **kw)


if __name__ == "__main__":
  main()
