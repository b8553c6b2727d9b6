"""Orbax checkpoints of the whole training state, with the data-iterator state and run metadata.

Layout of a workdir:
  checkpoints/<step>/state    TrainState (params, Adam state, step, counters, spike statistics)
  checkpoints/<step>/meta     JSON: data position, gin config text, model and optimizer config,
                              seed, tokenizer model (base64), batch shape
  data_state/<step>/stream_<k>.*    each row stream's tf.data iterator checkpoint (resumable.py)
  corrupt/                    checkpoints proven damaged, moved here (never deleted)
  unfinished/                 on object storage: saves that did not complete, moved here at start
  previous/<time>/            an earlier run's files, set aside by `--start_over`
The data state is written (synchronously) before Orbax starts its asynchronous save; Orbax writes
into a temporary directory and renames it when complete, so a step that Orbax lists always has its
data state, and a partly written checkpoint is never listed (never restored).

What is never lost (docs/checkpointing.md): a checkpoint is deleted only by the keep policy, after
a newer one is complete; a data state only when no checkpoint of its step exists on disk. A
checkpoint proven damaged is moved to corrupt/ (checkpoint_read.py: other read errors are retried,
then reported); one that does not fit the configuration, data settings included, stops the run
with a message (fit.py); a workdir with checkpoints never silently starts over.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from polylm_jax.checkpoint import fit
from polylm_jax.checkpoint.damage import _read, agree_on_restore
from polylm_jax.checkpoint.fit import check_model_compatible
from polylm_jax.checkpoint.on_disk import complete_steps, finished
from polylm_jax.config import ModelConfig
from polylm_jax.errors import (
  CheckpointSaveError,
  CorruptCheckpointError,
  DataStateMismatchError,
  NoUsableCheckpointError,
)
from polylm_jax.io import disk, storage
from polylm_jax.model import params as model_params
from polylm_jax.optimizer import chain_names
from polylm_jax.typecheck import check_fields


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

  def __post_init__(self):
    check_fields(self)
    if self.keep_last < 1:
      raise ValueError(f"CheckpointConfig.keep_last={self.keep_last} must be >= 1")


def save_args(tree, chunk_bytes: int, model_config: ModelConfig | None = None):
  """Orbax SaveArgs bounding every array's storage chunks to `chunk_bytes`; the [layers, ...]
  arrays of a scanned model are chunked layer by layer, so one layer reads alone."""
  layers = (
    model_config.num_layers if model_config is not None and model_config.scan_layers else None
  )

  def args(path, x):
    layered = (
      layers is not None
      and "blocks" in jax.tree_util.keystr(path)
      and getattr(x, "ndim", 0) >= 2
      and x.shape[0] == layers
    )
    return ocp.SaveArgs(chunk_byte_size=chunk_bytes, shard_axes=(0,) if layered else ())

  return jax.tree_util.tree_map_with_path(args, tree)


# Files an earlier run leaves in a workdir: `--start_over` moves them to previous/<time>/.
RUN_FILES = (
  "checkpoints",
  "data_state",
  "corrupt",
  "unfinished",
  "metrics.jsonl",
  "eval_metrics.jsonl",
  "tensorboard",
  "config.gin",
  "operative_config.gin",
)


def orbax_path(path: str | os.PathLike) -> epath.Path:
  """What Orbax is given: an absolute local path, or a URL (gs://...) as it is."""
  text = os.fspath(path)
  if storage.is_remote(text):
    storage.prepare(text)
    return epath.Path(text)
  return epath.Path(os.path.abspath(text))


def set_aside_previous_run(workdir: str | os.PathLike) -> str | None:
  """Moves an earlier run's files into <workdir>/previous/<time>/ (nothing is deleted)."""
  present = [name for name in storage.listdir(os.fspath(workdir)) if name in RUN_FILES]
  if not present:
    return None
  target = storage.join(workdir, "previous", disk.timestamp())
  storage.makedirs(target)
  for name in present:
    storage.move(storage.join(workdir, name), storage.join(target, name))
  logging.warning(
    "--start_over: the earlier run's files (%s) were moved to %s", ", ".join(present), target
  )
  return target


def checkpoint_steps(workdir: str | os.PathLike) -> list[int]:
  """The steps of the finished checkpoint directories in a workdir (no Orbax, no devices)."""
  root = storage.join(workdir, "checkpoints")
  return sorted(
    int(n) for n in storage.listdir(root) if n.isdigit() and finished(storage.join(root, n))
  )


class Checkpointer:
  def __init__(self, workdir: str | os.PathLike, config: CheckpointConfig, train_step):
    self.workdir = os.fspath(workdir)
    self.config = config
    self.train_step = train_step
    self.root = orbax_path(storage.join(self.workdir, "checkpoints"))
    self.data_dir = storage.join(self.workdir, "data_state")
    self.corrupt_dir = storage.join(self.workdir, "corrupt")
    self.lead = jax.process_index() == 0
    self.manager = ocp.CheckpointManager(
      self.root,
      options=ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_last,
        keep_period=config.keep_every,
        enable_async_checkpointing=config.async_save,
        create=True,
      ),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )
    self._in_flight: int | None = None  # the step of an asynchronous save not yet confirmed

  # --- saving -------------------------------------------------------------------------------
  def should_save(self, step: int) -> bool:
    return bool(self.config.every_steps) and step % self.config.every_steps == 0

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def save(self, step: int, state, data_iterator, meta: dict[str, Any]) -> None:
    self.wait()  # the previous save must have succeeded before anything else is written
    try:
      # tf.data writes its iterator checkpoints to a local directory (uploaded for a bucket).
      with storage.local_dir(storage.join(self.data_dir, str(step)), download=False) as local:
        data_iterator.save(local)
    except Exception as e:  # e.g. a full disk: the data state is part of the checkpoint
      raise self._save_error(step, e) from e
    opt = self.train_step.optimizer_config
    meta = dict(
      meta,
      step=step,
      data_position=data_iterator.position,
      optimizer_config=dataclasses.asdict(opt),
      optimizer_chain=chain_names(opt),
    )
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(
            state, save_args=save_args(state, self.config.chunk_bytes, self.train_step.model_config)
          ),
          meta=ocp.args.JsonSave(meta),
        ),
        force=True,
      )
    except Exception as e:
      raise self._save_error(step, e) from e
    self._in_flight = step
    if not self.config.async_save:
      self.wait()
    self._drop_orphan_data_states(keep=step)

  def wait(self) -> None:
    """Blocks until the save in flight is on disk; a failed save raises CheckpointSaveError."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_error(self._in_flight, e) from e
    self._in_flight = None

  def _save_error(self, step: int | None, e: Exception) -> CheckpointSaveError:
    intact = self.steps_on_disk()
    return CheckpointSaveError(
      f"saving checkpoint step {step} in {self.root} failed ({type(e).__name__}: "
      f"{str(e).splitlines()[0][:400]}); earlier checkpoints are untouched: {intact}"
    )

  def close(self) -> None:
    try:
      self.wait()
      # The keep policy removes a checkpoint once the newer save is complete: the data state of
      # one it removed at the last save goes now, not at a later run's first save.
      self._drop_orphan_data_states(keep=None)
    finally:
      self.manager.close()

  def steps_on_disk(self) -> list[int]:
    return checkpoint_steps(self.workdir)

  def _drop_orphan_data_states(self, keep: int | None) -> None:
    """Data states whose checkpoint is gone (rotated out by the keep policy, or never completed).
    Judged from what is on disk, never from Orbax's in-memory list: a step with any checkpoint
    directory (finished or in progress) keeps its data state."""
    if not self.lead:
      return
    on_disk = {n.split(".")[0] for n in storage.listdir(os.fspath(self.root))}
    if not on_disk:
      return
    for name in storage.listdir(self.data_dir):
      if name.isdigit() and (keep is None or int(name) != keep) and name not in on_disk:
        storage.remove_tree(storage.join(self.data_dir, name))

  # --- restoring ----------------------------------------------------------------------------
  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return self.root / str(step)

  def has_history(self) -> bool:
    """Checkpoints were written here before (some may have been moved to corrupt/)."""
    return bool(self.steps_on_disk()) or bool(storage.listdir(self.corrupt_dir))

  def _abstract_state(self):
    return with_shardings(
      jax.eval_shape(lambda: self.train_step.initial_state(0)), self.train_step.state_shardings
    )

  def _read_meta_and_leaves(self, step: int):
    def read():
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      tree = self.manager.item_metadata(step)["state"]
      tree = getattr(tree, "tree", tree)
      if not isinstance(meta, dict) or tree is None:
        raise ValueError("metadata missing")
      return meta, fit.saved_leaf_names(tree)

    return _read(self.step_dir(step), "metadata", read)

  def restore(
    self,
    step: int,
    data_iterator,
    *,
    reset_optimizer: bool = False,
    reset_data: bool = False,
    run_meta: dict[str, Any] | None = None,
  ) -> tuple[Any, dict[str, Any]]:
    """(state, meta) of one checkpoint. A damaged checkpoint raises CorruptCheckpointError, one
    that does not fit the configuration CheckpointMismatchError (fit.py; the data settings
    too, compared with `run_meta`, the metadata this start would save), one that cannot be read
    for another reason CheckpointReadError. Nothing is moved here."""
    where = self.step_dir(step)
    meta, saved = self._read_meta_and_leaves(step)
    check_model_compatible(
      meta.get("model_config"), self.train_step.model_config, f"checkpoint {where}"
    )
    fit.check_languages_compatible(
      meta.get("languages"), (run_meta or {}).get("languages"), f"checkpoint {where}"
    )
    expected = fit.leaf_names(self._abstract_state())
    params_of = lambda leaves: {k: v for k, v in leaves.items() if k.startswith("params.")}
    param_problems = fit.state_differences(params_of(saved), params_of(expected))
    if param_problems:
      raise fit.mismatch_error(str(where), param_problems, optimizer_only=False)
    problems = fit.state_differences(saved, expected)
    opt_now = dataclasses.asdict(self.train_step.optimizer_config)
    settings_changed = meta.get("optimizer_config", opt_now) != opt_now
    if problems and not reset_optimizer:
      raise fit.mismatch_error(
        str(where),
        fit.optimizer_differences(meta, self.train_step.optimizer_config) or problems,
        optimizer_only=True,
      )
    data_changes = (
      fit.data_differences(meta, run_meta)
      if data_iterator is not None and run_meta is not None
      else []
    )
    if data_changes and not reset_data:
      raise fit.data_mismatch_error(str(where), data_changes)
    if reset_optimizer and (problems or settings_changed):
      state = _read(where, "arrays", lambda: self._restore_with_fresh_optimizer(step))
    else:
      state = _read(
        where,
        "arrays",
        lambda: (
          self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(self._abstract_state()))
          ).state
        ),
      )
    if data_iterator is None:
      return state, meta
    if data_changes:
      data_iterator.start_afresh(meta["data_position"])
      logging.warning(
        "checkpoint step %d: parameters, optimizer state and step restored; the DATA STARTS "
        "AFRESH (TrainerConfig.reset_data): the configured pipelines begin at their start, at "
        "data position %d. Changed: %s",
        step,
        meta["data_position"],
        "; ".join(data_changes),
      )
      return state, meta
    state_dir = storage.join(self.data_dir, str(step))

    def read_data():
      try:
        with storage.local_dir(state_dir, download=True) as local:
          data_iterator.restore(local, meta["data_position"])
      except DataStateMismatchError as e:
        raise fit.data_mismatch_error(str(where), [str(e)]) from e

    _read(where, f"its data-iterator state {state_dir}", read_data)
    return state, meta

  def _restore_with_fresh_optimizer(self, step: int):
    """TrainerConfig.reset_optimizer: parameters, step and counters from the checkpoint, a fresh
    optimizer state for the configured optimizer."""
    abstract = self._abstract_state()
    item = {
      "params": abstract.params,
      "step": abstract.step,
      "nonfinite_total": abstract.nonfinite_total,
      "spike_stats": abstract.spike_stats,
    }
    restored = ocp.PyTreeCheckpointer().restore(
      self.step_dir(step) / "state",
      args=ocp.args.PyTreeRestore(
        item=item,
        restore_args=jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), item),
        partial_restore=True,
      ),
    )
    state = self.train_step.init_from_params(restored["params"])
    logging.warning(
      "checkpoint step %d: parameters, step and data position restored with a FRESH "
      "optimizer state (TrainerConfig.reset_optimizer; optimizer %s)",
      step,
      chain_names(self.train_step.optimizer_config),
    )
    return state.replace(
      step=restored["step"],
      nonfinite_total=restored["nonfinite_total"],
      spike_stats=restored["spike_stats"],
    )

  def quarantine(self, step: int) -> str:
    """Moves a damaged checkpoint (and its data state) to corrupt/; nothing is deleted."""
    target = storage.join(self.corrupt_dir, f"step_{step}-{disk.timestamp()}")
    if self.lead:
      storage.makedirs(target)
      for source, label in (
        (os.fspath(self.step_dir(step)), "checkpoint"),
        (storage.join(self.data_dir, str(step)), "data_state"),
      ):
        if storage.exists(source):
          storage.move(source, storage.join(target, label))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(f"polylm_quarantine_{step}")
    self.manager.reload()
    return target

  def _set_aside_unfinished(self) -> None:
    """On object storage a save cut short (a preempted or killed run) leaves a step directory
    without Orbax's commit marker, where the next save of that step would write: it is moved to
    unfinished/ (not deleted) before anything is restored or saved."""
    root = os.fspath(self.root)
    if not storage.is_remote(root):
      return
    if self.lead:
      for name in storage.listdir(root):
        step_dir = storage.join(root, name)
        if name.isdigit() and not finished(step_dir):
          target = storage.join(self.workdir, "unfinished", f"step_{name}-{disk.timestamp()}")
          storage.move(step_dir, target)
          logging.warning("checkpoint step %s was not finished; moved to %s", name, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("polylm_unfinished_set_aside")
    self.manager.reload()

  def restore_latest(
    self,
    data_iterator,
    *,
    reset_optimizer: bool = False,
    reset_data: bool = False,
    run_meta: dict[str, Any] | None = None,
  ) -> tuple[Any, dict[str, Any]] | None:
    """The newest checkpoint that can be read. Ones proven damaged are moved to corrupt/ and the
    previous one is tried; if none is left, NoUsableCheckpointError (the run never silently starts
    over). A configuration that does not fit, or a read that keeps failing without proving damage,
    stops here with nothing moved. None only when this workdir has no checkpoint history."""
    self._set_aside_unfinished()
    moved = []
    for step in reversed(self.steps()):
      try:
        restored = self.restore(
          step,
          data_iterator,
          reset_optimizer=reset_optimizer,
          reset_data=reset_data,
          run_meta=run_meta,
        )
        error: Exception | None = None
      except Exception as e:  # noqa: BLE001 (every host must learn what the others saw)
        restored, error = None, e
      try:
        agree_on_restore(step, str(self.step_dir(step)), error)
      except CorruptCheckpointError as e:
        target = self.quarantine(step)
        moved.append(str(target))
        logging.error("%s; moved to %s (not deleted); trying the previous checkpoint", e, target)
        continue
      return restored
    if moved or self.has_history():
      raise NoUsableCheckpointError(
        f"{self.root} has no checkpoint that can be read"
        + (
          f" (unreadable ones were moved to {self.corrupt_dir})"
          if storage.isdir(self.corrupt_dir)
          else ""
        )
        + ". The run will not start over on its own: restore a checkpoint there, or pass "
        "--start_over (polylm-train) to begin a new run in this workdir; the earlier files "
        "are then moved to previous/, not deleted."
      )
    return None


def with_shardings(abstract, shardings):
  """Restore targets: each abstract array with the sharding it should be read into."""
  return jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
  )


def _latest_step_dir(directory: str) -> str | None:
  steps = complete_steps(directory)
  return storage.join(directory, "checkpoints", str(steps[-1])) if steps else None


def restore_params(step_dir: str | os.PathLike, model_config: ModelConfig, shardings):
  """Just the parameters of a training checkpoint, read straight into `shardings`."""
  abstract = with_shardings(model_params.abstract_params(model_config), shardings)
  args = ocp.args.PyTreeRestore(
    item={"params": abstract},
    restore_args={
      "params": jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), abstract)
    },
    partial_restore=True,
  )
  state_dir = orbax_path(storage.join(step_dir, "state"))
  restored = _read(
    step_dir, "parameters", lambda: ocp.PyTreeCheckpointer().restore(state_dir, args=args)
  )
  return restored["params"]


def load_initial_params(directory: str | os.PathLike, train_step):
  """Initial parameters, restored straight into the train step's parameter shardings, from
  a `polylm-import` output (params/ + meta.json), a training checkpoint step directory
  (checkpoints/<step>) or a training workdir (its newest checkpoint)."""
  directory = os.fspath(directory)
  if storage.exists(storage.join(directory, "meta.json")):
    meta = json.loads(storage.read_text(storage.join(directory, "meta.json")))
    check_model_compatible(meta.get("model_config"), train_step.model_config, directory)
    abstract = with_shardings(
      model_params.abstract_params(train_step.model_config), train_step.param_shardings
    )
    return ocp.StandardCheckpointer().restore(
      orbax_path(storage.join(directory, "params")), abstract
    )
  has_state = storage.isdir(storage.join(directory, "state"))
  step_dir = directory if has_state else _latest_step_dir(directory)
  if step_dir is None or not storage.exists(storage.join(step_dir, "meta", "metadata")):
    raise FileNotFoundError(
      f"TrainerConfig.init_params_from={directory}: neither a polylm-import output "
      f"(meta.json), a checkpoint step directory (state/, meta/) nor a workdir with checkpoints"
    )
  meta = json.loads(storage.read_text(storage.join(step_dir, "meta", "metadata")))
  check_model_compatible(meta.get("model_config"), train_step.model_config, step_dir)
  return restore_params(step_dir, train_step.model_config, train_step.param_shardings)


def tokenizer_b64(path: str | os.PathLike) -> str:
  """The SentencePiece model (a local file or gs://...) for the checkpoint's metadata."""
  return base64.b64encode(storage.read_bytes(os.fspath(path))).decode()
