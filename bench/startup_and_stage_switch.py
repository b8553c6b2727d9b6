"""Start-up time and the cost of a curriculum stage switch, from the real `polylm-train` on the
quickstart config (tiny model, embedded 18-language corpus, CPU).

Two runs of the same config, one after the other, differing only in
`Curriculum.prepare_ahead_steps`: the default (the next stage's input pipeline is built and warmed
up in the background before its boundary) and 0 (built when the boundary is reached: the
baseline). Printed per run:
- seconds from starting the command to the first step's metrics record (imports, gin, the
  state's initialisation, the first batch, compiling the step);
- the step time after the stage boundary against the median step time (goal: <= 2x).

Metrics are read from the workdir's metrics.jsonl, where the trainer writes every step's
`step_time_s` (the wall time between two consecutive step reports; the report of step s follows
the dispatch of step s + 1, so the batch fetched at the boundary is in the record of the boundary
step itself).

  python bench/startup_and_stage_switch.py [--boundary 60 --steps 120]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time


def run(workdir: pathlib.Path, steps: int, boundary: int, prepare_ahead: int | None) -> dict:
  cmd = [
    sys.executable,
    "-m",
    "polylm_jax.train",
    "--gin_file=quickstart.gin",
    f"--workdir={workdir}",
    f"--gin_bindings=TrainerConfig.num_steps={steps}",
    f"--gin_bindings=final/Stage.start_step={boundary}",
    "--gin_bindings=TrainerConfig.eval_every=0",
    f"--gin_bindings=CheckpointConfig.every_steps={steps}",
  ]
  if prepare_ahead is not None:
    cmd.append(f"--gin_bindings=Curriculum.prepare_ahead_steps={prepare_ahead}")
  metrics = workdir / "metrics.jsonl"
  start = time.perf_counter()
  proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  first_step = None
  while proc.poll() is None:
    if first_step is None and metrics.is_file() and metrics.stat().st_size > 0:
      first_step = time.perf_counter() - start
    time.sleep(0.05)
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.read()[-3000:]}")
  records = [json.loads(line) for line in metrics.read_text().splitlines()]
  times = {r["step"]: r["step_time_s"] for r in records}
  steady = [t for s, t in times.items() if s > 5 and s != boundary]
  return {
    "first_step_s": first_step,
    "boundary_step_s": times[boundary],
    "median_step_s": statistics.median(steady),
    "max_other_step_s": max(steady),
  }


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--steps", type=int, default=120)
  parser.add_argument("--boundary", type=int, default=60)
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  rows = []
  for label, ahead in (("prepared ahead (default)", None), ("built at the boundary", 0)):
    with tempfile.TemporaryDirectory() as tmp:
      r = run(pathlib.Path(tmp) / "run", args.steps, args.boundary, ahead)
    rows.append((label, r))
    print(label, json.dumps(r), flush=True)
  print(f"\nquickstart config, {args.steps} steps, stage switch after step {args.boundary}\n")
  print("| next stage | command to first step | step at the switch | median step | ratio |")
  print("|---|---|---|---|---|")
  for label, r in rows:
    print(
      f"| {label} | {r['first_step_s']:.1f} s | {r['boundary_step_s']:.2f} s | "
      f"{r['median_step_s']:.2f} s | **{r['boundary_step_s'] / r['median_step_s']:.1f}x** |"
    )


if __name__ == "__main__":
  main()
