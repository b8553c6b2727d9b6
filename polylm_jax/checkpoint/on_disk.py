"""Reads a training checkpoint tensor by tensor (and layer by layer) without restoring it whole.

Orbax stores each array of `checkpoints/<step>/state` as a zarr array inside an OCDBT database;
tensorstore opens one array and reads just the slice asked for (one layer of a scanned
[layers, ...] parameter, or a block of embedding rows), so exporting a 13B checkpoint needs about
one tensor slice of host memory, not the model.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import tensorstore as ts

from polylm_jax.config import ModelConfig
from polylm_jax.io import storage

# On object storage Orbax writes a checkpoint in place (there is no rename) and marks it finished
# with this file; a step directory there without it is a save that did not complete. Locally an
# unfinished save keeps a temporary name (<step>.orbax-checkpoint-tmp-<time>).
COMMIT_MARKER = "commit_success.txt"


def finished(step_dir: str) -> bool:
  return not storage.is_remote(step_dir) or storage.exists(storage.join(step_dir, COMMIT_MARKER))


def complete_steps(workdir: str | os.PathLike) -> list[int]:
  """The finished steps under <workdir>/checkpoints with both state/ and meta/ (local or gs://)."""
  root = storage.join(workdir, "checkpoints")
  return sorted(
    int(n)
    for n in storage.listdir(root)
    if n.isdigit()
    and storage.isdir(storage.join(root, n, "state"))
    and storage.isdir(storage.join(root, n, "meta"))
    and finished(storage.join(root, n))
  )


def resolve_checkpoint(
  workdir: str | None = None, step: int | None = None, checkpoint: str | None = None
) -> str:
  """The `checkpoints/<step>` directory (local or gs://...): the latest complete one of a workdir,
  a chosen step, or an explicit path."""
  if checkpoint:
    if not storage.isdir(storage.join(checkpoint, "state")):
      raise FileNotFoundError(
        f"--checkpoint={checkpoint}: not a checkpoint step directory (no state/)"
      )
    return os.fspath(checkpoint)
  if not workdir:
    raise ValueError("give a training workdir (--workdir) or a checkpoint path (--checkpoint)")
  root = storage.join(workdir, "checkpoints")
  complete = complete_steps(workdir)
  if not complete:
    raise FileNotFoundError(f"--workdir={workdir}: no complete checkpoint under {root}")
  if step is None:
    return storage.join(root, str(complete[-1]))
  if step not in complete:
    raise FileNotFoundError(f"--step={step}: no such checkpoint in {root}; have {complete}")
  return storage.join(root, str(step))


class CheckpointReader:
  def __init__(self, step_dir: str | os.PathLike):
    text = os.fspath(step_dir)
    self.step_dir = text if storage.is_remote(text) else os.path.abspath(text)
    self.meta: dict[str, Any] = json.loads(
      storage.read_text(storage.join(self.step_dir, "meta", "metadata"))
    )
    fields = self.meta.get("model_config")
    if not fields:
      raise ValueError(f"{self.step_dir}: checkpoint metadata has no model_config")
    self.model_config = ModelConfig.from_dict(fields)
    self._open: dict[str, ts.TensorStore] = {}

  def _array(self, path: tuple) -> ts.TensorStore:
    key = ".".join(("params",) + tuple(str(p) for p in path))
    if key not in self._open:
      try:
        self._open[key] = ts.open(
          {
            "driver": "zarr",
            "kvstore": {
              "driver": "ocdbt",
              "base": _kvstore_url(storage.join(self.step_dir, "state")) + "/",
              "path": key,
            },
          },
          open=True,
          read=True,
        ).result()
      except ValueError as e:
        raise KeyError(f"{self.step_dir}: tensor {key} not found ({e})") from e
    return self._open[key]

  def read(self, path: tuple, layer: int | None = None, rows: slice | None = None) -> np.ndarray:
    """One parameter (a layer of it for scanned blocks; a row range if asked) as numpy."""
    arr = self._array(path)
    if layer is not None:
      arr = arr[layer]
    if rows is not None:
      arr = arr[rows]
    return np.asarray(arr.read().result())

  def param_shape(self, path: tuple, layer: int | None = None) -> tuple[int, ...]:
    shape = tuple(self._array(path).shape)
    return shape[1:] if layer is not None else shape


def _kvstore_url(path: str) -> str:
  """Tensorstore's URL of a directory: gs://... as it is, a local path as file://."""
  return path if storage.is_remote(path) else f"file://{path}"
