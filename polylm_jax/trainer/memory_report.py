"""What a compiled train step needs per device, from XLA's own analysis of the executable.

Used by `polylm-compile` (ahead of time, for a target topology) and by the trainer's first step
(the step as compiled for the devices it runs on, before it runs). Per device:
- arguments: the train state (parameters + optimizer state) and the batch;
- temporaries: activations kept for the backward pass, gradients, the loss's logits, ...;
- outputs not written in place of a donated argument;
- peak = arguments + temporaries + those outputs (what must fit in the device's memory);
- compiled FLOPs and bytes accessed (cost analysis), and their ratio, the arithmetic intensity.
"""

from __future__ import annotations

import dataclasses

GIB = 2.0**30

# HBM per chip (GiB), matched as substrings of jax.Device.device_kind (longest first).
HBM_GIB_BY_DEVICE_KIND = (
  ("TPU v6 lite", 32.0),
  ("TPU v5 lite", 16.0),
  ("TPU v5p", 95.0),
  ("TPU v5", 95.0),
  ("TPU v4", 32.0),
  ("H200", 141.0),
  ("H100", 80.0),
  ("A100", 80.0),
)


def hbm_bytes(device) -> float | None:
  """The device's memory: what the runtime reports (GPU), else the table (TPU topologies)."""
  try:
    stats = device.memory_stats() or {}
  except Exception:  # AOT topology devices and the CPU have no memory stats
    stats = {}
  if stats.get("bytes_limit"):
    return float(stats["bytes_limit"])
  for key, gib in HBM_GIB_BY_DEVICE_KIND:
    if key in device.device_kind:
      return gib * GIB
  return None


@dataclasses.dataclass(frozen=True)
class StepMemory:
  arguments: int
  temporaries: int
  outputs: int
  aliased: int
  flops: float | None
  bytes_accessed: float | None

  @property
  def peak(self) -> int:
    return self.arguments + self.temporaries + max(self.outputs - self.aliased, 0)

  @property
  def intensity(self) -> float | None:
    if not self.flops or not self.bytes_accessed:
      return None
    return self.flops / self.bytes_accessed


def analyse(compiled) -> StepMemory:
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, list):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return StepMemory(
    arguments=int(mem.argument_size_in_bytes),
    temporaries=int(mem.temp_size_in_bytes),
    outputs=int(mem.output_size_in_bytes),
    aliased=int(mem.alias_size_in_bytes),
    flops=cost.get("flops"),
    bytes_accessed=cost.get("bytes accessed"),
  )


@dataclasses.dataclass(frozen=True)
class ModelWork:
  """The step's useful FLOPs per device (flops.py), what the compiled count cannot give when
  layers are scanned: XLA's cost analysis counts a loop body once, not once per layer."""

  flops_per_device: float
  scanned_layers: bool
  peak_flops: float | None = None  # the device's peak FLOP/s, when known


def model_work(model, batch_size: int, seq_len: int, devices, peak_flops=None) -> ModelWork:
  from polylm_jax.trainer import flops

  per_device = flops.train_flops_per_token(model, seq_len) * batch_size * seq_len / len(devices)
  return ModelWork(per_device, model.scan_layers, peak_flops)


def report_lines(
  m: StepMemory, hbm: float | None, where: str, work: ModelWork | None = None
) -> list[str]:
  lines = [
    f"train step per device on {where}:",
    f"  arguments (train state + batch) {m.arguments / GIB:8.2f} GiB",
    f"  temporaries                     {m.temporaries / GIB:8.2f} GiB",
    f"  outputs not donated in place    {max(m.outputs - m.aliased, 0) / GIB:8.2f} GiB",
    f"  peak                            {m.peak / GIB:8.2f} GiB"
    + (f" of {hbm / GIB:.1f} GiB ({m.peak / hbm:.0%})" if hbm else " (device memory unknown)"),
  ]
  if m.flops:
    lines.append(
      f"  compiled FLOPs {m.flops:.3e}, bytes accessed {m.bytes_accessed or 0:.3e}, "
      f"arithmetic intensity {m.intensity or 0:.1f} FLOP/byte"
      + (" (XLA counts the scanned layer body once)" if work and work.scanned_layers else "")
    )
  if work:
    line = f"  model FLOPs {work.flops_per_device:.3e} a step (6N + attention, flops.py)"
    if work.peak_flops:
      ms = 1e3 * work.flops_per_device / work.peak_flops
      line += f": >= {ms:.1f} ms at the device's peak {work.peak_flops:.3g} FLOP/s"
    lines.append(line)
  return lines


def knobs(model, loss, optimizer=None, mesh=None) -> str:
  """What to change for a step to fit, leaving out what the config already does."""
  out = [
    "a smaller DataConfig.batch_size"
    + (
      " (or OptimizerConfig.grad_accum_steps > 1 for the same global batch)"
      if optimizer is None or getattr(optimizer, "grad_accum_steps", 1) == 1
      else " (or more OptimizerConfig.grad_accum_steps for the same global batch)"
    )
  ]
  if getattr(model, "remat_policy", None) != "full":
    out.append("ModelConfig.remat_policy = 'full' (keeps least for the backward pass)")
  if mesh is None or getattr(mesh, "fsdp", 1) != -1:
    out.append("a larger MeshConfig.fsdp (shards parameters and optimizer state over more devices)")
  if getattr(loss, "impl", None) != "tiled":
    out.append(
      "TrainerConfig.loss = @LossConfig() with LossConfig.impl = 'tiled' (no whole logits)"
    )
  else:
    out.append("smaller LossConfig.token_tile / vocab_tile (smaller logit tiles)")
  return "to fit: " + ", ".join(out)
