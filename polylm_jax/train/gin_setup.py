"""gin for every command-line tool: the configurables, where the shipped gin files are, parsing.

The library's config dataclasses know nothing of gin; they are registered here under the names the
gin files use (`TrainerConfig`, `DataConfig`, ...), and the training entry point (`train/run.py`)
as `train`. Tools that read a training gin file (polylm-train, polylm-cache) parse it here.
"""

from __future__ import annotations

import pathlib

import gin

from polylm_jax.errors import ConfigError

# The shipped gin files, inside the package (also a non-editable install or a wheel has them).
GIN_DIR = pathlib.Path(__file__).resolve().parents[1] / "gin_configs"  # polylm_jax/gin_configs

_train_fn = None  # the training entry point as wrapped by gin


def register_configurables():
  """Makes the config dataclasses gin-configurable without gin in the library modules; returns
  the gin-wrapped training entry point (train/run.py)."""
  global _train_fn
  if _train_fn is not None:
    return _train_fn
  from polylm_jax import console

  console.import_tensorflow()  # the data pipeline's: its import-time notices filtered
  from polylm_jax import chat, sharding
  from polylm_jax import config as model_configs
  from polylm_jax import languages as language_sets
  from polylm_jax.checkpoint.manager import CheckpointConfig
  from polylm_jax.data.curriculum import Curriculum, Stage
  from polylm_jax.data.pipeline import DataConfig
  from polylm_jax.kernels.common import BlockSizes
  from polylm_jax.optimizer import OptimizerConfig
  from polylm_jax.train.run import run
  from polylm_jax.trainer import loop
  from polylm_jax.trainer.loss import LossConfig
  from polylm_jax.trainer.spikes import SpikeConfig

  gin.external_configurable(model_configs.model_config, "model_config")
  gin.external_configurable(OptimizerConfig, "OptimizerConfig")
  gin.external_configurable(sharding.MeshConfig, "MeshConfig")
  gin.external_configurable(DataConfig, "DataConfig")
  gin.external_configurable(Curriculum, "Curriculum")
  gin.external_configurable(Stage, "Stage")
  from polylm_jax.data.instructions import InstructionCorpora
  from polylm_jax.data.sources import BitextCorpora, TextCorpora

  gin.external_configurable(InstructionCorpora, "InstructionCorpora")
  gin.external_configurable(chat.InstructionFormat, "InstructionFormat")
  gin.external_configurable(TextCorpora, "TextCorpora")
  gin.external_configurable(BitextCorpora, "BitextCorpora")
  gin.external_configurable(loop.TrainerConfig, "TrainerConfig")
  gin.external_configurable(LossConfig, "LossConfig")
  gin.external_configurable(BlockSizes, "BlockSizes")
  gin.external_configurable(CheckpointConfig, "CheckpointConfig")
  gin.external_configurable(SpikeConfig, "SpikeConfig")
  gin.external_configurable(language_sets.Languages, "Languages")
  _train_fn = gin.external_configurable(run, "train")
  return _train_fn


def parse_gin(gin_files: list[str], bindings: list[str]) -> None:
  for f in gin_files:
    if not pathlib.Path(f).is_file() and not (GIN_DIR / f).is_file():
      raise ConfigError(
        f"--gin_file={f}: no such file (looked in the current directory and {GIN_DIR})"
      )
  gin.clear_config()  # one run per parse: bindings never leak between in-process runs
  gin.add_config_file_search_path(str(GIN_DIR))
  for f in gin_files:
    gin.add_config_file_search_path(str(pathlib.Path(f).resolve().parent))
  try:
    gin.parse_config_files_and_bindings(
      [f if pathlib.Path(f).is_file() else str(GIN_DIR / f) for f in gin_files], bindings
    )
  except (ValueError, KeyError, IOError, SyntaxError) as e:
    raise ConfigError(f"gin configuration error: {e}{hint(str(e))}") from e


def hint(message: str) -> str:
  """What to do about a gin error: the setting a %gin.REQUIRED asks for, or the names closest
  to a misspelt configurable or parameter."""
  import difflib
  import inspect
  import re

  from gin import config as gin_config

  if m := re.search(r"([\w./]+) set to `?%gin\.REQUIRED", message):
    return (
      f" (set {m.group(1)} in your gin file or with --gin_bindings, e.g. "
      f"--gin_bindings='{m.group(1)} = ...')"
    )
  registry = gin_config._REGISTRY  # gin has no public listing of its configurables
  if m := re.search(r"No configurable matching '([\w.]+)'", message):
    names = {selector.split(".")[-1] for selector, _ in registry.items()}
    close = difflib.get_close_matches(m.group(1).split(".")[-1], sorted(names), n=3)
  elif m := re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", message):
    try:
      fn = registry.get_match(m.group(1)).wrapped
      params = list(inspect.signature(fn).parameters)
    except (KeyError, ValueError, TypeError):
      return ""
    close = difflib.get_close_matches(m.group(2), params, n=3)
  else:
    return ""
  return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""


def configured(name: str, default=None):
  """The object a parsed gin config binds to `name` (e.g. 'train.model'), built now; `default`
  when the config does not bind it."""
  try:
    reference = gin.query_parameter(name)
  except ValueError:
    return default
  if reference is None:
    return default
  return (
    reference.scoped_configurable_fn()
    if hasattr(reference, "scoped_configurable_fn")
    else reference
  )
