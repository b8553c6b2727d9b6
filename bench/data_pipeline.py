"""Data pipeline throughput, in one run on the same text (the Universal Dependencies sentences
embedded in the package, polylm_jax/data/sample/ud), all with the same SentencePiece model:

1. raw SentencePiece encode (python list API, one thread): the limit;
2. this pipeline end to end (read files, drop bad records, tokenize, tag, pack, mix 18 languages,
   batch), tokens per CPU-second of the process (tf.data runs several threads);
3. reading an already-tokenized, packed cache, made once by Apache Beam (DirectRunner) through
   seqio's cached-task path, as training reads it (DataConfig.use_cached).

Goals (data issue): 2 >= 50% of 1 per core; 3 >= 1M tokens/s per core.

  python bench/data_pipeline.py [--batches 200]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import resource
import shutil
import tempfile
import time


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", type=int, default=2000)
  # Until every task's shuffle buffer (8 blocks of 1024 documents) has filled once.
  parser.add_argument("--warmup", type=int, default=1500)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from polylm_jax.data import pipeline, resumable, sample, sources, tokenizer
  from polylm_jax.data.curriculum import Curriculum, Stage

  files = {p.stem: str(p) for p in sorted(sample.TREEBANK_DIR.glob("*.txt"))}
  corpus = f"UD treebank text ({sample.TREEBANK_DIR})"
  lines = [
    line for path in files.values() for line in pathlib.Path(path).read_text("utf-8").splitlines()
  ]
  sp = tokenizer.load(sample.TOKENIZER_MODEL)
  # 1. raw encode, one thread.
  reps = max(1, 200_000 // max(len(lines), 1))
  t, c = time.perf_counter(), cpu_seconds()
  raw_tokens = sum(len(ids) for _ in range(reps) for ids in sp.encode(lines, num_threads=1))
  raw_wall, raw_cpu = time.perf_counter() - t, cpu_seconds() - c
  raw_rate = raw_tokens / raw_cpu
  # 2. end to end.
  sources.TextCorpora(
    files={k: {"train": v} for k, v in files.items()}, prefix="bench_pt_"
  ).register()
  curriculum = Curriculum(stages=(Stage(rates={f"bench_pt_{k}": 1.0 for k in files}),))
  config = pipeline.DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, seed=0)
  batches = resumable.StagedBatches(curriculum, config)
  # Warm-up (not counted, printed): graph construction and the first fill of every task's
  # shuffle buffer and prefetch queues; the figure below is the steady state.
  t, c = time.perf_counter(), cpu_seconds()
  for _ in range(args.warmup):
    next(batches)
  warm_wall, warm_cpu = time.perf_counter() - t, cpu_seconds() - c
  t, c = time.perf_counter(), cpu_seconds()
  tokens = 0
  for _ in range(args.batches):
    tokens += int(next(batches)["weights"].sum())
  e2e_wall, e2e_cpu = time.perf_counter() - t, cpu_seconds() - c
  e2e_rate = tokens / e2e_cpu
  # 3. cached: the same corpus tokenized and packed once by Apache Beam (DirectRunner, seqio's
  #    cached-task path), then read by the training pipeline (DataConfig.use_cached).
  from polylm_jax.data import cache

  cache_dir = tempfile.mkdtemp()
  names = sources.TextCorpora(
    files={k: {"train": v} for k, v in files.items()},
    prefix="bench_cached_",
    cache_seq_len=args.seq_len,
  ).register()
  t = time.perf_counter()
  cache.cache_tasks(names, cache_dir)
  beam_wall = time.perf_counter() - t
  cached = resumable.StagedBatches(
    Curriculum(stages=(Stage(rates={n: 1.0 for n in names}),)),
    dataclasses.replace(config, use_cached=True, cache_dirs=(cache_dir,)),
  )
  for _ in range(args.warmup):
    next(cached)
  t, c = time.perf_counter(), cpu_seconds()
  cached_tokens = 0
  for _ in range(args.batches):
    cached_tokens += int(next(cached)["weights"].sum())
  cached_wall, cached_cpu = time.perf_counter() - t, cpu_seconds() - c
  shutil.rmtree(cache_dir)
  cached_rate = cached_tokens / cached_cpu
  print(
    f"machine: {os.cpu_count()} cores; corpus: {corpus}, {len(lines)} lines, 18 languages; "
    f"tokenizer: sample_sp.model ({sp.vocab_size()} pieces); rows {args.batch_size} x "
    f"{args.seq_len}"
  )
  print(
    f"1. raw SentencePiece encode  : {raw_rate / 1e6:6.2f} M tokens per CPU-second "
    f"({raw_tokens / raw_wall / 1e6:.2f} M/s wall)"
  )
  print(
    f"2. pipeline end to end       : {e2e_rate / 1e6:6.2f} M tokens per CPU-second "
    f"({tokens / e2e_wall / 1e6:.2f} M/s wall) = {e2e_rate / raw_rate:.0%} of raw encode "
    f"(goal >= 50%); warm-up {args.warmup} batches: {warm_wall:.1f} s wall, {warm_cpu:.1f} "
    f"CPU-s"
  )
  print(
    f"3. Beam cache, read          : {cached_rate / 1e6:6.2f} M tokens per CPU-second "
    f"({cached_tokens / cached_wall / 1e6:.2f} M/s wall) (goal >= 1 M per core); making the "
    f"cache with DirectRunner took {beam_wall:.0f} s wall"
  )


if __name__ == "__main__":
  main()
