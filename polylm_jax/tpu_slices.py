"""Cloud TPU slice names and shapes, in one table for `polylm-compile` (ahead-of-time targets) and
launch/gke_jobset.py (GKE node selectors). Standard library only: the launcher runs where the
training dependencies are not installed.

Names: v4-N and v5p-N count TensorCores (two per chip); v5e-N and v6e-N count chips. Every host
of a multi-host slice has 4 chips.
"""

from __future__ import annotations

import re

# Slice name -> topology, for the common shapes of each generation.
TOPOLOGIES = {
  "v4": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "2x4x4", 128: "4x4x4", 256: "4x4x8"},
  "v5p": {8: "2x2x1", 16: "2x2x2", 32: "2x2x4", 64: "4x4x2", 128: "4x4x4", 256: "4x4x8"},
  "v5e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
  "v6e": {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"},
}
CORES_PER_CHIP = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# GKE's node label cloud.google.com/gke-tpu-accelerator for multi-host slices of each generation.
GKE_ACCELERATOR = {
  "v4": "tpu-v4-podslice",
  "v5p": "tpu-v5p-slice",
  "v5e": "tpu-v5-lite-podslice",
  "v6e": "tpu-v6e-slice",
}
CHIPS_PER_HOST = 4


def parse(target: str) -> tuple[str, int]:
  """'v5p-64' -> ('v5p', 64); an unknown name fails listing the known ones."""
  m = re.fullmatch(r"(v4|v5p|v5e|v6e)-(\d+)", target)
  if not m or int(m.group(2)) not in TOPOLOGIES[m.group(1)]:
    known = ", ".join(f"{g}-{n}" for g, sizes in TOPOLOGIES.items() for n in sizes)
    raise ValueError(f"not a known TPU slice ({known})")
  return m.group(1), int(m.group(2))


def topology_name(target: str) -> str:
  """'v5p-64' -> 'v5p:4x4x2'; a topology ('v5p:4x4x2') is returned as it is."""
  if ":" in target:
    return target
  generation, n = parse(target)
  return f"{generation}:{TOPOLOGIES[generation][n]}"


def chips(target: str) -> int:
  generation, n = parse(target)
  return n // CORES_PER_CHIP[generation]


def hosts(target: str) -> int:
  return max(1, chips(target) // CHIPS_PER_HOST)
