"""What elastic data costs one host: the same global batches drawn from K row streams
(DataConfig.streams, data/resumable.py) on one process, K = 1 (the baseline) and more.

Printed per K: seconds to the first batch (K pipelines fill their shuffle buffers), rows per second
over the following batches, and the size of the saved data state, each against K = 1 in the same
run. The mixture is the embedded 18-language sample.

  python bench/row_streams.py [--streams 1 2 4 8 --batches 200 --batch_size 16 --seq_len 128]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import tempfile
import time


def measure(config, batches: int) -> tuple[float, float, int]:
  from polylm_jax.data import resumable

  it = resumable.BatchIterator(config)
  start = time.perf_counter()
  next(it)
  first = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  rows_per_s = batches * config.batch_size / (time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as d:
    it.save(d)
    size = sum(f.stat().st_size for f in pathlib.Path(d).iterdir())
  return first, rows_per_s, size


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--streams", type=int, nargs="+", default=[1, 2, 4, 8])
  parser.add_argument("--batches", type=int, default=200)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--seq_len", type=int, default=128)
  args = parser.parse_args()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from polylm_jax.data import pipeline, tasks  # noqa: F401 (registers the sample)

  base = None
  print("| streams | first batch s | rows/s | vs 1 stream | saved state MB | vs 1 stream |")
  print("|---|---|---|---|---|---|")
  for k in args.streams:
    config = pipeline.DataConfig(
      mixture="polylm_sample", seq_len=args.seq_len, batch_size=args.batch_size, streams=k
    )
    first, rate, size = measure(config, args.batches)
    base = base or (rate, size)
    print(
      f"| {k} | {first:.1f} | {rate:.0f} | {rate / base[0]:.2f}x | {size / 1e6:.1f} | "
      f"{size / base[1]:.2f}x |",
      flush=True,
    )


if __name__ == "__main__":
  main()
