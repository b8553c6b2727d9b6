"""`polylm-compile`: does a training config fit its target, before the job starts?

    polylm-compile --gin_file=runs/polylm_13b.gin --gin_file=my_data.gin --target=v5p-128
    polylm-compile --gin_file=quickstart.gin                       (this machine's devices)

Compiles the real train step (the same gin files: model, optimizer, mesh, batch, sequence length,
remat policy, attention kernel, loss) for the target's devices without running it, and prints per
device what XLA's analysis of the executable says: arguments (train state + batch), temporaries,
peak against the device's memory, compiled FLOPs and arithmetic intensity (memory_report.py).
Exits 0 when the step fits, 1 (with the settings that would make it fit) when it does not, 2 on a
configuration error.

TPU targets are compiled ahead of time on any host with libtpu installed (requirements-tpu.txt;
no TPU needed): a slice name (v4-N, v5p-N: N TensorCores, two per chip; v5e-N, v6e-N: N chips) or
a topology (v5p:4x4x2, v5e:16x16). GPUs cannot be targeted without the GPU itself: on a GPU host
run with `--target=local`, or read the same report that polylm-train logs before its first step.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from polylm_jax import tpu_slices
from polylm_jax.errors import ConfigError
from polylm_jax.train import gin_setup


def topology_name(target: str) -> str:
  """'v5p-64' -> 'v5p:4x4x2'; a topology ('v5p:4x4x2') is returned as it is."""
  try:
    return tpu_slices.topology_name(target)
  except ValueError as e:
    raise SystemExit(f"--target={target}: {e}, nor a topology such as v5p:4x4x2") from e


def target_devices(target: str):
  import jax

  if target == "local":
    return jax.devices(), f"{len(jax.devices())} x {jax.devices()[0].device_kind} (this host)"
  # Only compiles for the topology: libtpu must not insist on owning a TPU (or its lock file),
  # nor look for a TPU VM's metadata (it prints alarming errors about worker hostnames when it
  # finds none). On a TPU VM these are already set and kept.
  for key, value in (
    ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ("TPU_SKIP_MDS_QUERY", "1"),
    ("TPU_ACCELERATOR_TYPE", target if ":" not in target else "v5p-8"),
    ("TPU_WORKER_HOSTNAMES", "localhost"),
    ("TPU_WORKER_ID", "0"),
  ):
    os.environ.setdefault(key, value)
  from jax.experimental import topologies

  name = topology_name(target)
  try:
    topo = topologies.get_topology_desc(topology_name=name, platform="tpu")
  except Exception as e:  # no libtpu, or a topology libtpu does not know
    raise SystemExit(
      f"--target={target}: cannot describe TPU topology {name!r} ({e}); TPU targets need libtpu "
      "(pip install -r requirements-tpu.txt, or jax[tpu])"
    ) from e
  devices = list(topo.devices)
  kind = getattr(devices[0], "device_kind", "TPU")
  return devices, f"{target} ({name}: {len(devices)} x {kind}, ahead of time)"


# Settings a fit check does not need (no data is read; the schedule's length does not change
# memory) that a preset may leave %gin.REQUIRED: bound to these when the config leaves them unset.
NOT_NEEDED = {"TrainerConfig.num_steps": "1000000", "DataConfig.mixture": "'polylm_sample'"}


def _parse(gin_files: list[str], bindings: list[str]) -> None:
  """gin_setup.parse_gin, with placeholders for the settings above where they are REQUIRED."""
  import re

  extra: list[str] = []
  while True:
    try:
      gin_setup.parse_gin(gin_files, bindings + extra)
      return
    except ConfigError as e:
      m = re.search(r"([\w.]+) set to `?%gin\.REQUIRED", str(e))
      name = m.group(1) if m else None
      if name not in NOT_NEEDED or any(b.startswith(f"{name} =") for b in extra):
        raise SystemExit(str(e)) from e
      extra.append(f"{name} = {NOT_NEEDED[name]}")
      logging.info(
        "%s is not set; a fit check does not depend on it (taken as %s)", name, NOT_NEEDED[name]
      )


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="polylm-compile",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--gin_file", action="append", default=[], required=True)
  parser.add_argument("--gin_bindings", action="append", default=[])
  parser.add_argument("--target", default="local", help="local | a TPU slice or topology")
  parser.add_argument(
    "--hbm_gib", type=float, default=None, help="device memory to check against (default: known)"
  )
  args = parser.parse_args(argv)
  from polylm_jax import console

  console.quiet_logging()
  console.choose_platform()
  from polylm_jax import languages, sharding
  from polylm_jax.trainer import memory_report
  from polylm_jax.trainer.loop import TrainerConfig
  from polylm_jax.trainer.step import TrainStep

  gin_setup.register_configurables()
  _parse(args.gin_file, args.gin_bindings)
  model = gin_setup.configured("train.model")
  optimizer = gin_setup.configured("train.optimizer")
  mesh_config = gin_setup.configured("train.mesh")
  data = gin_setup.configured("train.data")
  trainer = gin_setup.configured("train.trainer", TrainerConfig())
  for name, value in (("model", model), ("optimizer", optimizer), ("mesh", mesh_config)):
    if value is None:
      raise SystemExit(f"the gin config binds no train.{name}")
  if data is None:
    raise SystemExit("the gin config binds no train.data (DataConfig: batch_size, seq_len)")
  language_set = gin_setup.configured("train.languages", languages.DEFAULT)
  devices, where = target_devices(args.target)
  mesh = sharding.make_mesh(mesh_config, devices)
  try:
    step = TrainStep(
      model_config=model,
      optimizer_config=optimizer,
      mesh=mesh,
      rules=mesh_config.effective_rules,
      total_steps=trainer.num_steps,
      language_slots=language_set.slots,
      loss_config=trainer.loss,
    )
    step.check_batch_shape(data.batch_size)
  except ValueError as e:  # a setting the step cannot take: a configuration error (status 2)
    raise SystemExit(str(e)) from e
  advice = memory_report.knobs(model, trainer.loss, optimizer, mesh_config)
  print(
    f"{model.name}: batch {data.batch_size} x {data.seq_len}, mesh {dict(mesh.shape)}, remat "
    f"{model.remat_policy}, attention {model.attention_impl}, loss {trainer.loss.impl}",
    flush=True,
  )
  lowered = step.lower(step.abstract_state(), step.abstract_batch(data.batch_size, data.seq_len))
  try:
    compiled = lowered.compile()
  except Exception as e:  # the TPU compiler itself refuses a program larger than the chip's HBM
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    reason = next((line for line in str(e).splitlines() if "memory" in line), str(e))
    print(f"DOES NOT FIT: the compiler for {where} refuses the step: {reason.strip()}")
    print(advice)
    return 1
  m = memory_report.analyse(compiled)
  hbm = args.hbm_gib * memory_report.GIB if args.hbm_gib else memory_report.hbm_bytes(devices[0])
  from polylm_jax.trainer import flops

  peak = flops.peak_flops_per_device(devices[0])
  work = memory_report.model_work(model, data.batch_size, data.seq_len, devices, peak)
  print("\n".join(memory_report.report_lines(m, hbm, where, work)))
  if hbm is None:
    print("device memory unknown: pass --hbm_gib to check the fit")
    return 0
  if m.peak > hbm:
    print(f"DOES NOT FIT: {m.peak / memory_report.GIB:.1f} GiB > {hbm / memory_report.GIB:.1f}")
    print(advice)
    return 1
  print(f"fits ({hbm - m.peak:.3g} bytes to spare per device)")
  return 0


def console_main() -> None:
  try:
    code = main(sys.argv[1:])
  except SystemExit as e:
    if isinstance(e.code, str):
      print(f"polylm-compile: {e.code}", file=sys.stderr)
      sys.exit(2)
    raise
  sys.exit(code)


if __name__ == "__main__":
  console_main()
