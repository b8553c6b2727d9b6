"""What elastic data costs one host: the same global batches drawn from K row streams
(DataConfig.streams, data/resumable.py) on one process, K = 1 (the baseline) and more.

The corpus: the UD sentences embedded in the package, each language's file repeated --repeat
times (so every stream's shard is much larger than a task's shuffle buffer, as with real
corpora), 18 file-backed tasks mixed equally. Printed per K, each against K = 1 in the same run:
seconds to the first batch (K pipelines start and fill their shuffle buffers), then, after
--warmup batches, rows per second and rows per CPU-second over --batches batches, and the size
of the saved data state.

  python bench/row_streams.py [--streams 1 2 4 --repeat 30 --warmup 300 --batches 600]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import resource
import tempfile
import time


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def measure(config, warmup: int, batches: int) -> tuple[float, float, float, int]:
  from polylm_jax.data import resumable

  it = resumable.BatchIterator(config)
  start = time.perf_counter()
  next(it)
  first = time.perf_counter() - start
  for _ in range(warmup):
    next(it)
  start, cpu = time.perf_counter(), cpu_seconds()
  for _ in range(batches):
    next(it)
  rows = batches * config.batch_size
  wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu
  with tempfile.TemporaryDirectory() as d:
    it.save(d)
    size = sum(f.stat().st_size for f in pathlib.Path(d).iterdir())
  return first, rows / wall, rows / cpu, size


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4])
  parser.add_argument("--repeat", type=int, default=30)
  parser.add_argument("--warmup", type=int, default=300)
  parser.add_argument("--batches", type=int, default=600)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=128)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import seqio

  from polylm_jax.data import pipeline, sample, sources

  with tempfile.TemporaryDirectory() as corpus:
    files = {}
    for path in sorted(sample.TREEBANK_DIR.glob("*.txt")):
      out = pathlib.Path(corpus) / path.name
      out.write_text(path.read_text("utf-8") * args.repeat, "utf-8")
      files[path.stem] = {"train": str(out)}
    sources.TextCorpora(files=files, prefix="bench_streams_").register()
    seqio.MixtureRegistry.add("bench_streams", [(f"bench_streams_{k}", 1.0) for k in files])
    print(
      f"{len(files)} tasks, UD sentences x {args.repeat}; batch {args.batch_size} x "
      f"{args.seq_len}; {args.warmup} batches of warm-up, {args.batches} measured"
    )
    print("| streams | first batch s | rows/s | vs 1 | rows per CPU-s | vs 1 | saved MB | vs 1 |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for k in args.streams:
      config = pipeline.DataConfig(
        mixture="bench_streams", seq_len=args.seq_len, batch_size=args.batch_size, streams=k
      )
      first, rate, per_cpu, size = measure(config, args.warmup, args.batches)
      base = base or (rate, per_cpu, size)
      print(
        f"| {k} | {first:.1f} | {rate:.0f} | {rate / base[0]:.2f}x | {per_cpu:.0f} | "
        f"{per_cpu / base[1]:.2f}x | {size / 1e6:.1f} | {size / base[2]:.2f}x |",
        flush=True,
      )


if __name__ == "__main__":
  main()
