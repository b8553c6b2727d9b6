"""Orbax checkpoints of the whole training state, with the data-iterator state and run metadata.

Layout of a workdir:
  checkpoints/<step>/state    TrainState (params, Adam state, step, counters, spike statistics)
  checkpoints/<step>/meta     JSON: data position, gin config text, model config, seed,
                              tokenizer model (base64), batch shape
  data_state/<step>/process_<i>.*   each process's tf.data iterator checkpoint
The data state is written (synchronously) before Orbax starts its asynchronous save; Orbax writes
into a temporary directory and renames it when complete, so a step that Orbax lists always has its
data state, and a partly written checkpoint is never listed (never restored).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from polylm_jax.config import ModelConfig
from polylm_jax.model import params as model_params


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 1000  # periodic save (0: only at the end and on preemption)
  keep_last: int = 3  # K most recent checkpoints kept
  keep_every: int | None = None  # also keep every M-th step for good (None: none)
  async_save: bool = True
  enabled: bool = True
  # Largest stored chunk of an array. Small chunks let restore and polylm-export read one layer
  # (or a block of embedding rows) without decompressing a whole [layers, ...] array.
  chunk_bytes: int = 64 * 2**20


def save_args(tree, chunk_bytes: int, model_config: ModelConfig | None = None):
  """Orbax SaveArgs bounding every array's storage chunks to `chunk_bytes`; the [layers, ...]
  arrays of a scanned model are chunked layer by layer, so one layer reads alone."""
  layers = model_config.num_layers if model_config is not None and model_config.scan_layers else None

  def args(path, x):
    layered = (layers is not None and "blocks" in jax.tree_util.keystr(path)
               and getattr(x, "ndim", 0) >= 2 and x.shape[0] == layers)
    return ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if layered else ())
  return jax.tree_util.tree_map_with_path(args, tree)


class CheckpointMismatchError(ValueError):
  pass


class Checkpointer:

  def __init__(self, workdir: str | pathlib.Path, config: CheckpointConfig, train_step):
    self.workdir = pathlib.Path(workdir)
    self.config = config
    self.train_step = train_step
    self.data_dir = self.workdir / "data_state"
    self.manager = ocp.CheckpointManager(
        (self.workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last, keep_period=config.keep_every,
            enable_async_checkpointing=config.async_save, create=True),
        item_names=("state", "meta"))

  # --- saving -------------------------------------------------------------------------------
  def should_save(self, step: int) -> bool:
    return bool(self.config.every_steps) and step % self.config.every_steps == 0

  def save(self, step: int, state, data_iterator, meta: dict[str, Any]) -> None:
    data_iterator.save(str(self.data_dir / str(step)))
    meta = dict(meta, step=step, data_position=data_iterator.position)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state, save_args=save_args(
            state, self.config.chunk_bytes, self.train_step.model_config)),
        meta=ocp.args.JsonSave(meta)), force=True)
    self._drop_orphan_data_states(keep=step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()

  def _drop_orphan_data_states(self, keep: int) -> None:
    kept = set(self.manager.all_steps()) | {keep}
    if self.data_dir.is_dir():
      for d in self.data_dir.iterdir():
        if d.name.isdigit() and int(d.name) not in kept:
          shutil.rmtree(d, ignore_errors=True)

  # --- restoring ----------------------------------------------------------------------------
  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def _abstract_state(self):
    return with_shardings(jax.eval_shape(lambda: self.train_step._init_state(0)),
                          self.train_step.state_shardings)

  def check_compatible(self, step: int, meta: dict[str, Any]) -> None:
    check_model_compatible(meta.get("model_config"), self.train_step.model_config,
                           f"checkpoint step {step} in {self.workdir / 'checkpoints'}")

  def restore(self, step: int, data_iterator) -> tuple[Any, dict[str, Any]]:
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    self.check_compatible(step, meta)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(self._abstract_state())))
    if data_iterator is not None:
      data_iterator.restore(str(self.data_dir / str(step)), meta["data_position"])
    return restored.state, meta

  def restore_latest(self, data_iterator) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that restores; unreadable ones are skipped with a warning."""
    for step in reversed(self.steps()):
      try:
        return self.restore(step, data_iterator)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # a corrupt directory: say which, fall back to the previous one
        logging.warning("checkpoint %s is unreadable (%s: %s); trying the previous one",
                        self.workdir / "checkpoints" / str(step), type(e).__name__, e)
    return None


def with_shardings(abstract, shardings):
  """Restore targets: each abstract array with the sharding it should be read into."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def check_model_compatible(saved: dict[str, Any] | None, current: ModelConfig, where: str) -> None:
  """Parameters saved for another model fail here, naming the mismatched names and shapes."""
  if saved is None:
    return
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  saved_cfg = dataclasses.replace(current, **{k: v for k, v in saved.items() if k in known})
  shapes = lambda c: {jax.tree_util.keystr(p): tuple(x.shape) for p, x in
                      jax.tree_util.tree_leaves_with_path(model_params.abstract_params(c))}
  old, new = shapes(saved_cfg), shapes(current)
  diffs = sorted(f"{k}: checkpoint {old.get(k)} vs model {new.get(k)}"
                 for k in set(old) | set(new) if old.get(k) != new.get(k))
  if diffs:
    raise CheckpointMismatchError(
        f"{where} was saved for model {saved.get('name')!r}, which does not match "
        f"{current.name!r}: " + "; ".join(diffs[:10]) + (" ..." if len(diffs) > 10 else ""))


def load_initial_params(directory: str | pathlib.Path, train_step):
  """Parameters written by `polylm-import` (or any params-only Orbax checkpoint with meta.json),
  restored straight into the train step's parameter shardings."""
  directory = pathlib.Path(directory)
  meta_path = directory / "meta.json"
  if not meta_path.is_file():
    raise FileNotFoundError(f"TrainerConfig.init_params_from={directory}: no meta.json (write it "
                            f"with polylm-import)")
  meta = json.loads(meta_path.read_text())
  check_model_compatible(meta.get("model_config"), train_step.model_config, str(directory))
  abstract = with_shardings(model_params.abstract_params(train_step.model_config),
                            train_step.param_shardings)
  return ocp.StandardCheckpointer().restore((directory / "params").absolute(), abstract)


def tokenizer_b64(path: str | pathlib.Path) -> str:
  return base64.b64encode(pathlib.Path(path).read_bytes()).decode()
