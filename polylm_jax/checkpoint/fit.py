"""Does a checkpoint fit the configured training state?

A checkpoint whose arrays differ from what the configuration builds (another model, another
optimizer chain) is a configuration error that says what differs and how to go on. It is never a
reason to skip the checkpoint, and never a reason to start the run over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from typing import Any

import jax

from polylm_jax.config import ModelConfig
from polylm_jax.errors import CheckpointMismatchError
from polylm_jax.model import params as model_params
from polylm_jax.optimizer import CHAIN_SETTINGS, OptimizerConfig, chain_names

Leaves = dict[str, tuple[tuple[int, ...], str]]  # dotted name -> (shape, dtype)


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def leaf_names(tree) -> Leaves:
  """Dotted leaf names as Orbax writes them (`opt_state.1.mu.wte`), with shapes and dtypes."""
  return {
    ".".join(_key(k) for k in path): (tuple(x.shape), str(x.dtype))
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def saved_leaf_names(metadata_tree) -> Leaves:
  """The same from an Orbax checkpoint's tree metadata (no array is read)."""
  leaves = jax.tree.leaves(metadata_tree, is_leaf=lambda x: hasattr(x, "shape"))
  return {x.name: (tuple(x.shape), str(x.dtype)) for x in leaves}


def check_model_compatible(saved: dict[str, Any] | None, current: ModelConfig, where: str) -> None:
  """Parameters saved for another model fail here, naming the mismatched names and shapes."""
  if saved is None:
    return
  known = {f.name for f in dataclasses.fields(ModelConfig)}
  saved_cfg = dataclasses.replace(current, **{k: v for k, v in saved.items() if k in known})
  shapes = lambda c: {
    jax.tree_util.keystr(p): tuple(x.shape)
    for p, x in jax.tree_util.tree_leaves_with_path(model_params.abstract_params(c))
  }
  old, new = shapes(saved_cfg), shapes(current)
  diffs = sorted(
    f"{k}: checkpoint {old.get(k)} vs model {new.get(k)}"
    for k in set(old) | set(new)
    if old.get(k) != new.get(k)
  )
  if diffs:
    fields = [
      f"{f}: checkpoint {getattr(saved_cfg, f)!r}, config {getattr(current, f)!r}"
      for f in sorted(known)
      if f != "name" and getattr(saved_cfg, f) != getattr(current, f)
    ]
    raise CheckpointMismatchError(
      f"{where} was saved for model {saved.get('name')!r}, which does not match "
      f"{current.name!r}: "
      + "; ".join(diffs[:10])
      + (" ..." if len(diffs) > 10 else "")
      + (f" (ModelConfig differs: {'; '.join(fields)})" if fields else "")
    )


def check_languages_compatible(
  saved: list[str] | None, configured: list[str] | None, where: str
) -> None:
  """Per-language tags and loss slots are positions in the language set: another set would
  silently mix languages up. (None: not recorded, nothing to compare.)"""
  now = None if configured is None else list(configured)
  if saved is not None and now is not None and list(saved) != now:
    raise CheckpointMismatchError(
      f"{where} was trained with the language set {saved}, but this run configures {now} "
      f"(Languages.codes); per-language tags would mean other languages. Set Languages.codes "
      f"to the checkpoint's list (a new run in another --workdir may use any set)"
    )


def optimizer_differences(saved_meta: dict[str, Any], current: OptimizerConfig) -> list[str]:
  """'checkpoint has X, config has none' lines from the optimizer chain recorded at save time."""
  saved = saved_meta.get("optimizer_chain")
  if saved is None:
    return []
  now = chain_names(current)
  out = []
  for name in list(dict.fromkeys(saved + now)):
    setting = CHAIN_SETTINGS.get(name)
    hint = f" (OptimizerConfig.{setting} = {getattr(current, setting)!r})" if setting else ""
    if name in saved and name not in now:
      out.append(f"optimizer state: checkpoint has {name}, config has none{hint}")
    elif name in now and name not in saved:
      out.append(f"optimizer state: config has {name}{hint}, checkpoint has none")
  if not out and saved != now:
    out.append(f"optimizer state: checkpoint chain {saved}, config chain {now}")
  return out


def state_differences(saved: Leaves, expected: Leaves) -> list[str]:
  """Leaf-level differences between a checkpoint's arrays and the configured state's."""
  only_saved = sorted(set(saved) - set(expected))
  only_expected = sorted(set(expected) - set(saved))
  changed = sorted(
    f"{k}: checkpoint {saved[k][0]} {saved[k][1]}, config {expected[k][0]} {expected[k][1]}"
    for k in set(saved) & set(expected)
    if saved[k] != expected[k]
  )
  out = []
  if only_saved:
    out.append(
      f"arrays only in the checkpoint: {only_saved[:5]}"
      + (f" (+{len(only_saved) - 5} more)" if len(only_saved) > 5 else "")
    )
  if only_expected:
    out.append(
      f"arrays only in the configured state: {only_expected[:5]}"
      + (f" (+{len(only_expected) - 5} more)" if len(only_expected) > 5 else "")
    )
  if changed:
    out.append(f"arrays of another shape or dtype: {changed[:5]}")
  return out


def mismatch_error(
  step_dir: str, problems: list[str], *, optimizer_only: bool
) -> CheckpointMismatchError:
  how = (
    (
      "To keep its parameters, step and data position and start a fresh optimizer state for the "
      "new settings, set TrainerConfig.reset_optimizer = True; to start a new run from its "
      f"parameters, use another --workdir with TrainerConfig.init_params_from = '{step_dir}'; "
      "or go back to the settings it was saved with."
    )
    if optimizer_only
    else (
      "Go back to the settings it was saved with, or start a new run in another --workdir "
      "(TrainerConfig.init_params_from loads parameters of a matching model)."
    )
  )
  return CheckpointMismatchError(
    f"checkpoint {step_dir} does not match the configured training state (a configuration "
    f"change, not a damaged checkpoint; nothing was changed on disk): "
    + "; ".join(problems)
    + ". "
    + how
  )


# The DataConfig settings a saved data-iterator state depends on: with another value the state
# either cannot be restored (another batch shape or pipeline) or would not continue the run's
# sequence of batches. (cache_dirs, where a cache lives, and streams, checked by the iterator,
# may change.)
DATA_SETTINGS = ("mixture", "seq_len", "batch_size", "seed", "split", "shuffle", "use_cached")


def data_signature(meta: dict[str, Any], position: int) -> dict[str, Any]:
  """What the data state at batch `position` depends on, from a checkpoint's metadata (or this
  start's): the DataConfig settings above and the mixture's tasks and rates, or, with a
  curriculum, the stage that feeds that position (later stages may change)."""
  data = meta.get("data_config") or {}
  sig: dict[str, Any] = {f"DataConfig.{k}": data[k] for k in DATA_SETTINGS if k in data}
  if meta.get("tokenizer_model_b64"):  # the ids every document became (train.tokenizer)
    digest = hashlib.sha256(meta["tokenizer_model_b64"].encode()).hexdigest()[:12]
    sig["train.tokenizer"] = f"SentencePiece model sha256 {digest}"
  table = meta.get("curriculum")
  if table is None:
    sig["data source"] = "DataConfig.mixture"
    if "mixture_rates" in meta:
      sig["mixture tasks and rates"] = meta["mixture_rates"]
    return sig
  sig.pop("DataConfig.mixture", None)  # not used with a curriculum
  sig["data source"] = "a curriculum (train.curriculum)"
  lines = table.splitlines()
  starts = [int(m.group(1)) if (m := re.search(r" from step (\d+):", x)) else 0 for x in lines]
  sig["curriculum stage feeding this position"] = lines[
    max(i for i, s in enumerate(starts) if s <= position)
  ]
  return sig


def data_differences(saved_meta: dict[str, Any], run_meta: dict[str, Any]) -> list[str]:
  """'setting: checkpoint X, config Y' for the data settings that differ at the checkpoint's
  data position (settings a checkpoint predates are not compared)."""
  position = int(saved_meta.get("data_position", 0))
  saved, now = data_signature(saved_meta, position), data_signature(run_meta, position)
  return [
    f"{k}: checkpoint {saved[k]!r}, config {now[k]!r}"
    for k in saved
    if k in now and saved[k] != now[k]
  ]


def data_mismatch_error(step_dir: str, problems: list[str]) -> CheckpointMismatchError:
  return CheckpointMismatchError(
    f"checkpoint {step_dir} was saved with other data settings, so its data-iterator state "
    f"cannot continue this configuration's batches (a configuration change, not a damaged "
    f"checkpoint; nothing was changed on disk): "
    + "; ".join(problems)
    + ". Go back to the settings it was saved with, or set TrainerConfig.reset_data = True to "
    "keep its parameters, optimizer state and step and start the configured data afresh from "
    "its beginning (later checkpoints then resume normally)."
  )
