"""The fit table of docs/scale.md: for each model and TPU slice, the largest global batch (rows of
2048 tokens) whose train step fits per `polylm-compile`, and a gin preset for that row.

Every figure comes from compiling the real train step ahead of time for the slice (libtpu, no TPU
needed): parameters and optimizer state sharded over every chip (FSDP), the vocabulary-tiled
loss, the Pallas TPU attention kernel. For each remat policy, from the cheapest to the one that
recomputes most, the batch is doubled from where the previous policy stopped while it fits; a row
takes the largest batch found and the cheapest policy that reaches it.

  python bench/fit_table.py [--models polylm_1.7b polylm_13b] [--targets v5p-8 v5p-64 v5e-256]
                            [--max_batch 2048] [--write_presets polylm_jax/gin_configs/runs/fit]
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import re
import subprocess
import sys
import tempfile
import time

from polylm_jax.tpu_slices import chips

POLICIES = ("none", "dots_no_batch", "full")  # cheapest first

PRESET = """\
# {model} on a {target} slice ({chips} chips): the largest global batch whose train step fits,
# per `polylm-compile --target={target}` ({peak:.1f} of {hbm:.1f} GiB per chip; docs/scale.md).
# Parameters and optimizer state are sharded over every chip (FSDP). Add your data and steps:
#   polylm-train --gin_file=runs/fit/{stem}.gin --gin_file=my_data.gin --workdir=...
include 'runs/pretrain.gin'
include 'models/{model}.gin'

DataConfig.seq_len = 2048
DataConfig.batch_size = {batch}
MeshConfig.data = 1
MeshConfig.fsdp = -1
model_config.overrides = {{'remat_policy': '{policy}', 'attention_impl': 'pallas_tpu'}}
TrainerConfig.loss = @LossConfig()
LossConfig.impl = 'tiled'
LossConfig.token_tile = 4096
LossConfig.vocab_tile = 16384
"""


@dataclasses.dataclass
class Fit:
  fits: bool
  peak_gib: float
  hbm_gib: float
  seconds: float


def preset_text(model: str, target: str, batch: int, policy: str, fit: Fit) -> str:
  return PRESET.format(
    model=model,
    target=target,
    chips=chips(target),
    stem=stem(model, target),
    batch=batch,
    policy=policy,
    peak=fit.peak_gib,
    hbm=fit.hbm_gib,
  )


def stem(model: str, target: str) -> str:
  return f"{model.replace('.', '_')}_{target.replace('-', '_')}"


def compile_fit(model: str, target: str, batch: int, policy: str) -> Fit:
  gin = preset_text(model, target, batch, policy, Fit(False, 0, 0, 0))
  with tempfile.NamedTemporaryFile("w", suffix=".gin") as f:
    f.write(gin)
    f.flush()
    start = time.perf_counter()
    run = subprocess.run(
      [
        sys.executable,
        "-m",
        "polylm_jax.train.compile_cli",
        f"--gin_file={f.name}",
        f"--target={target}",
        "--gin_bindings=TrainerConfig.num_steps = 100000",
        "--gin_bindings=DataConfig.mixture = 'polylm_sample'",
      ],
      capture_output=True,
      text=True,
    )
  seconds = time.perf_counter() - start
  m = re.search(r"peak\s+([\d.]+) GiB of ([\d.]+) GiB", run.stdout)
  if m:
    peak, hbm = float(m.group(1)), float(m.group(2))
  else:  # refused by the compiler: "... HLO temporaries (141.07G) exceeds available HBM (95.74G)"
    m = re.search(r"\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", run.stdout)
    peak, hbm = (float(m.group(1)), float(m.group(2))) if m else (float("nan"), float("nan"))
  if run.returncode not in (0, 1) or not m:
    raise RuntimeError(
      f"{model} on {target}, batch {batch}, remat {policy}: polylm-compile exited "
      f"{run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    )
  return Fit(run.returncode == 0, peak, hbm, seconds)


def search(model: str, target: str, max_batch: int):
  """(batch, policy, fit) of the largest batch that fits, or None; prints every compile."""
  best = None
  batch = chips(target)
  for policy in POLICIES:
    while batch <= max_batch:
      fit = compile_fit(model, target, batch, policy)
      print(
        f"  {model} {target} batch {batch:5d} remat {policy:13s}: peak {fit.peak_gib:6.1f} / "
        f"{fit.hbm_gib:.0f} GiB {'fits' if fit.fits else 'does not fit'} ({fit.seconds:.0f} s)",
        flush=True,
      )
      if not fit.fits:
        break
      best = (batch, policy, fit)
      batch *= 2
    if batch > max_batch:
      break
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="+", default=["polylm_1.7b", "polylm_13b"])
  parser.add_argument("--targets", nargs="+", default=["v5p-8", "v5p-64", "v5e-256"])
  parser.add_argument("--max_batch", type=int, default=2048, help="PolyLM-13B's global batch")
  parser.add_argument("--write_presets", default=None, help="directory for one gin file per row")
  args = parser.parse_args()
  rows = []
  for model in args.models:
    for target in args.targets:
      found = search(model, target, args.max_batch)
      rows.append((model, target, found))
      if found and args.write_presets:
        batch, policy, fit = found
        out = pathlib.Path(args.write_presets) / f"{stem(model, target)}.gin"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(preset_text(model, target, batch, policy, fit))
  print(
    "\n| model | slice (chips) | largest batch x 2048 | remat | peak / HBM per chip | preset |\n"
    "|---|---|---|---|---|---|"
  )
  for model, target, found in rows:
    if found is None:
      print(f"| {model} | {target} ({chips(target)}) | none fits | | | |")
      continue
    batch, policy, fit = found
    capped = " (cap)" if batch * 2 > args.max_batch else ""
    print(
      f"| {model} | {target} ({chips(target)}) | {batch}{capped} | {policy} | "
      f"{fit.peak_gib:.1f} / {fit.hbm_gib:.0f} GiB | runs/fit/{stem(model, target)}.gin |"
    )


if __name__ == "__main__":
  main()
