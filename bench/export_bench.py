"""Export cost of the polylm_1.7b config (random init, parameters only): time and peak host memory
(RSS) of `polylm-export` against the float32 checkpoint size (goal: peak RSS < 40% of it).

Phase 1 (own process) writes a workdir-style checkpoint; phase 2 (own process, so its peak RSS
is its own) exports it to safetensors.

  python bench/export_bench.py [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time


def write_checkpoint(workdir: str) -> None:
  import jax
  import orbax.checkpoint as ocp

  from polylm_jax.config import PRESETS
  from polylm_jax.data import sample
  from polylm_jax.model import params as P

  cfg = PRESETS["polylm_1.7b"]
  params = jax.jit(lambda: P.init_params(cfg, 0))()
  step_dir = os.path.join(workdir, "checkpoints", "0")
  checkpointer = ocp.StandardCheckpointer()
  from polylm_jax.checkpoint.manager import CheckpointConfig, save_args

  tree = {"params": params}  # what Checkpointer writes, less the optimizer state
  checkpointer.save(
    os.path.join(step_dir, "state"),
    tree,
    save_args=save_args(tree, CheckpointConfig().chunk_bytes, cfg),
  )
  checkpointer.wait_until_finished()
  os.makedirs(os.path.join(step_dir, "meta"))
  meta = {
    "model_config": dataclasses.asdict(cfg),
    "step": 0,
    "gin_config": "",
    "tokenizer_model_b64": base64.b64encode(sample.TOKENIZER_MODEL.read_bytes()).decode(),
  }
  with open(os.path.join(step_dir, "meta", "metadata"), "w") as f:
    json.dump(meta, f)


def export(workdir: str, out: str, dtype: str) -> None:
  import memory  # bench/memory.py

  from polylm_jax.checkpoint import on_disk
  from polylm_jax.export import export_cli as cli

  rss_before = memory.current_gib()
  memory.reset_peak()
  t = time.perf_counter()
  cli.export_checkpoint(on_disk.resolve_checkpoint(workdir), out, dtype=dtype)
  seconds = time.perf_counter() - t
  print(
    json.dumps({"seconds": seconds, "rss_before_gb": rss_before, "peak_rss_gb": memory.peak_gib()})
  )


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--phase", choices=("write", "export"))
  parser.add_argument("--workdir")
  parser.add_argument("--out")
  args = parser.parse_args()
  if args.phase == "write":
    return write_checkpoint(args.workdir)
  if args.phase == "export":
    return export(args.workdir, args.out, args.dtype)
  root = tempfile.mkdtemp()
  workdir, out = os.path.join(root, "run"), os.path.join(root, "hf")
  subprocess.run(
    [sys.executable, __file__, "--phase", "write", "--workdir", workdir],
    check=True,
    capture_output=True,
  )
  result = subprocess.run(
    [
      sys.executable,
      __file__,
      "--phase",
      "export",
      "--workdir",
      workdir,
      "--out",
      out,
      "--dtype",
      args.dtype,
    ],
    check=True,
    capture_output=True,
    text=True,
  )
  r = json.loads(result.stdout.strip().splitlines()[-1])
  from polylm_jax.config import PRESETS, analytic_param_count

  f32_gb = analytic_param_count(PRESETS["polylm_1.7b"]) * 4 / 2**30
  written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 2**30
  shutil.rmtree(root)
  print(f"machine: {os.cpu_count()} cores")
  print(
    f"polylm_1.7b export to {args.dtype} safetensors ({written:.2f} GiB written): "
    f"{r['seconds']:.1f} s"
  )
  print(
    f"peak RSS {r['peak_rss_gb']:.2f} GiB (resident before the export {r['rss_before_gb']:.2f} GiB)"
    f" = {r['peak_rss_gb'] / f32_gb:.1%} of the float32 checkpoint ({f32_gb:.2f} GiB); "
    f"goal < 40%"
  )


if __name__ == "__main__":
  main()
