"""Checkpoint costs, printed in one run:

1. step time of the `small` config with an asynchronous Orbax save in flight vs without (goal:
   at most 10% slower);
2. save and restore time and peak host memory (RSS) of a parameters-only checkpoint of the
   `polylm_1.7b` config (random init, float32, about 7 GB), each phase in its own process.

  python bench/checkpoint_bench.py [--skip_1p7b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import memory  # bench/memory.py
import numpy as np


def step_time_with_async_save(steps: int) -> None:
  from polylm_jax import sharding
  from polylm_jax.checkpoint.manager import CheckpointConfig, Checkpointer
  from polylm_jax.config import PRESETS
  from polylm_jax.optimizer import OptimizerConfig
  from polylm_jax.trainer.step import TrainStep

  cfg = PRESETS["small"].replace(dtype="float32")
  mesh = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  step = TrainStep(
    model_config=cfg,
    optimizer_config=OptimizerConfig(warmup_steps=1),
    mesh=mesh,
    rules=sharding.DEFAULT_RULES,
    total_steps=10_000,
  )
  state = step.init(0)
  rng = np.random.default_rng(0)
  toks = rng.integers(3, cfg.vocab_size, (8, 513)).astype(np.int32)
  batch = step.place_batch(
    {
      "inputs": toks[:, :-1],
      "targets": toks[:, 1:],
      "weights": np.ones((8, 512), np.float32),
      "positions": np.tile(np.arange(512, dtype=np.int32), (8, 1)),
      "segment_ids": np.ones((8, 512), np.int32),
    }
  )

  def timed_steps(n):
    nonlocal state
    times = []
    for _ in range(n):
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    return times

  timed_steps(2)  # compile
  base = statistics.median(timed_steps(steps))

  class NoData:
    position = 0

    def save(self, directory):
      os.makedirs(directory, exist_ok=True)

  workdir = tempfile.mkdtemp()
  ckpt = Checkpointer(workdir, CheckpointConfig(async_save=True), step)
  t = time.perf_counter()
  ckpt.save(1, state, NoData(), {})
  dispatch = time.perf_counter() - t
  during = []
  while len(during) < steps:
    during += timed_steps(1)
  in_flight = (
    ckpt.manager.is_saving_in_progress() if hasattr(ckpt.manager, "is_saving_in_progress") else None
  )
  t = time.perf_counter()
  ckpt.wait()
  finish = time.perf_counter() - t
  ckpt.close()
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(workdir) for f in fs)
  shutil.rmtree(workdir)
  during_med = statistics.median(during)
  first = dispatch + during[0]  # the step that pays for starting the save and runs beside it
  print(f"small config, batch 8 x 512, float32; train state {size / 2**20:.0f} MiB on disk")
  print(f"  step time without a save: {base * 1e3:.0f} ms (median of {steps})")
  print(
    f"  the step during which the async save starts and runs: {first * 1e3:.0f} ms "
    f"(save() blocked {dispatch * 1e3:.0f} ms for the device-to-host copy) -> "
    f"{first / base - 1:+.1%} (goal <= +10%)"
  )
  print(
    f"  the {steps} steps after the save started: median {during_med * 1e3:.0f} ms "
    f"({during_med / base - 1:+.1%}); {finish * 1e3:.0f} ms of saving left after them"
    f"{'' if in_flight is None else f' (still saving: {in_flight})'}"
  )


def phase(kind: str, directory: str) -> None:
  """One measurement, in a fresh process so that its peak RSS is its own."""
  import orbax.checkpoint as ocp

  from polylm_jax.config import PRESETS
  from polylm_jax.model import params as P

  cfg = PRESETS["polylm_1.7b"]
  ckptr = ocp.StandardCheckpointer()
  if kind == "save":
    params = jax.jit(lambda: P.init_params(cfg, 0))()
    jax.block_until_ready(params)
    before = memory.current_gib()
    memory.reset_peak()
    t = time.perf_counter()
    from polylm_jax.checkpoint.manager import CheckpointConfig, save_args

    ckptr.save(directory, params, save_args=save_args(params, CheckpointConfig().chunk_bytes, cfg))
    ckptr.wait_until_finished()
    seconds = time.perf_counter() - t
  else:
    abstract = P.abstract_params(cfg)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract
    )
    before = memory.current_gib()
    memory.reset_peak()
    t = time.perf_counter()
    params = ckptr.restore(directory, abstract)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t
  print(json.dumps({"seconds": seconds, "peak_rss_gb": memory.peak_gib(), "rss_before_gb": before}))


def one_point_seven_b() -> None:
  directory = os.path.join(tempfile.mkdtemp(), "params")
  results = {}
  for kind in ("save", "restore"):
    out = subprocess.run(
      [sys.executable, __file__, "--phase", kind, "--dir", directory],
      capture_output=True,
      text=True,
      check=True,
    )
    results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)
  shutil.rmtree(os.path.dirname(directory))
  print(f"polylm_1.7b parameters only (float32, {size / 2**30:.2f} GiB on disk):")
  for kind, r in results.items():
    print(
      f"  {kind:7s}: {r['seconds']:.1f} s, {size / 2**30 / r['seconds']:.2f} GiB/s; peak RSS "
      f"{r['peak_rss_gb']:.1f} GiB during the {kind} (resident before it: "
      f"{r['rss_before_gb']:.1f} GiB)"
    )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--skip_1p7b", action="store_true")
  parser.add_argument("--only_1p7b", action="store_true")
  parser.add_argument("--phase", choices=("save", "restore"))
  parser.add_argument("--dir")
  args = parser.parse_args()
  if args.phase:
    phase(args.phase, args.dir)
    return
  print(f"machine: {os.cpu_count()} cores; jax {jax.__version__}")
  if not args.only_1p7b:
    step_time_with_async_save(args.steps)
  if not args.skip_1p7b:
    one_point_seven_b()


if __name__ == "__main__":
  main()
