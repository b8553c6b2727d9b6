"""Instruction-tuning throughput vs pre-training throughput, same model, same batch shape, same run:
what the loss mask and whole-example packing cost (goal: under 5%).

Both feed the jitted train step from the real data pipeline (pre-training: the embedded corpus's
`polylm_sample` mixture; SFT: the embedded instruction sample, `polylm_sft`), timing steps after a
warm-up (compile, shuffle buffers), data loading included. tokens/s counts every position of the
rows (the step's work), not only the weighted ones.

  python bench/sft_bench.py [--preset small] [--seq 512] [--batch 8] [--steps 20]
"""

from __future__ import annotations

import argparse
import os
import time

import jax
from decode_bench import cpu_name


def tokens_per_second(step, data_config, steps: int, warmup: int) -> float:
  from polylm_jax.data import resumable

  batches = resumable.BatchIterator(data_config)
  state = step.init(0)
  for _ in range(warmup):
    state, metrics = step(state, step.place_batch(next(batches)))
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, step.place_batch(next(batches)))
  jax.block_until_ready(metrics)
  return steps * data_config.batch_size * data_config.seq_len / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small")
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=2, help="alternate the two, this many times")
  args = parser.parse_args()
  from polylm_jax import sharding
  from polylm_jax.config import PRESETS
  from polylm_jax.data import instructions, pipeline, tasks
  from polylm_jax.optimizer import OptimizerConfig
  from polylm_jax.trainer.step import TrainStep

  cfg = PRESETS[args.preset].replace(dtype="float32")
  instructions.InstructionCorpora(embedded_sample=True).register(tasks.vocabulary(), args.seq)
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  step = TrainStep(
    model_config=cfg,
    optimizer_config=OptimizerConfig(warmup_steps=1),
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    total_steps=10_000,
  )
  print(
    f"SFT vs pre-training: {cfg.name} float32, rows {args.batch} x {args.seq}, {args.steps} "
    f"timed steps; jax {jax.__version__}; CPU {cpu_name()} ({os.cpu_count()} cores)"
  )
  for r in range(args.rounds):
    rates = {}
    for name, mixture in (("pre-training", "polylm_sample"), ("SFT", "polylm_sft")):
      data = pipeline.DataConfig(mixture=mixture, seq_len=args.seq, batch_size=args.batch)
      rates[name] = tokens_per_second(step, data, args.steps, args.warmup)
    ratio = rates["SFT"] / rates["pre-training"]
    print(
      f"round {r + 1}: pre-training {rates['pre-training']:,.0f} tokens/s | SFT "
      f"{rates['SFT']:,.0f} tokens/s | SFT / pre-training {ratio:.3f}",
      flush=True,
    )


if __name__ == "__main__":
  main()
