"""What the tests train, in one place: polylm-train arguments for short runs of the quickstart
config (one shape and schedule for all of them, SHORT; with frequent checkpoints, CHECKPOINTED),
and a TrainStep of the tiny model. Test modules import these (`from runs import ...`); conftest.py
also hands them over as the fixtures `train_args` and `tiny_step`. Also: putting back the
environment variables a command-line run sets (`restore_env`)."""

from __future__ import annotations

import os
import subprocess
from typing import Any, Mapping, Sequence

# What polylm-eval sets in the process's environment (--data_dir, offline mode).
EVAL_ENV = ("HF_HOME", "HF_DATASETS_CACHE", "HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "SACREBLEU")


def restore_env(monkeypatch, keys: Sequence[str] = EVAL_ENV) -> None:
  """After the test, each variable is as it was: a set one keeps its value, an unset one is
  unset again (not left empty: an empty Hugging Face cache variable means the current
  directory, and a run would cache datasets in the checkout)."""
  for key in keys:
    if key in os.environ:
      monkeypatch.setenv(key, os.environ[key])
    else:  # recorded as unset, then removed: whatever the test sets is undone
      monkeypatch.setenv(key, "")
      monkeypatch.delenv(key)


def install_stamp(root, requirements: str = "requirements.txt") -> str:
  """The line launch/env.sh records in .venv/.polylm-installed once `requirements` (and the
  package) are installed from the checkout at `root`: with it there, sourcing env.sh with that
  file installs nothing."""
  digest = subprocess.run(
    "cat requirements*.txt pyproject.toml | sha256sum | cut -c1-16",
    shell=True,
    cwd=root,
    capture_output=True,
    text=True,
    check=True,
  ).stdout.strip()
  return f"{digest} {requirements} \n"


QUICKSTART = "gin_configs/quickstart.gin"

# What a short run of the tiny model trains with unless a test is about one of these settings:
# rows of 64 tokens, 8 rows a batch, a 2-step warmup and a 30-step schedule whatever num_steps
# is. The schedule is compiled into the train step, so with one schedule the short runs of all
# tests share one compiled step per mesh and language set (read back from JAX's compilation
# cache instead of compiled again).
SHORT = {
  "DataConfig.seq_len": 64,
  "DataConfig.batch_size": 8,
  "OptimizerConfig.warmup_steps": 2,
  "OptimizerConfig.decay_steps": 30,
}
# The same as gin bindings ('DataConfig.seq_len = 64', ...) and as command-line flags.
SHORT_BINDINGS = tuple(f"{k} = {v}" for k, v in SHORT.items())
SHORT_FLAGS = tuple(f"--gin_bindings={b}" for b in SHORT_BINDINGS)

# The quickstart curriculum over English, German and Thai instead of the sample's 18 languages:
# each language is a pipeline the trainer traces, checks for data and evaluates on, so a short
# run starts about four times sooner. Tests about the languages themselves (held-out loss per
# language, a 19th language, the README's quickstart) train on all of them.
FEW_LANGUAGES = ("stage1/Stage.tasks = ('de', 'th')", "final/Stage.tasks = ('de', 'th')")
# The same as command-line flags, for tests that write polylm-train's arguments out themselves.
FEW_LANGUAGE_FLAGS = tuple(f"--gin_bindings={b}" for b in FEW_LANGUAGES)


def train_args(
  workdir,
  bindings: Mapping[str, Any] | Sequence[str] = (),
  *gin_files: str,
  all_languages: bool = False,
) -> list[str]:
  """`--gin_file=gin_configs/quickstart.gin` (then each of `gin_files`), `--workdir`, and one
  `--gin_bindings` per binding, given as {'TrainerConfig.num_steps': 6} or as
  ['TrainerConfig.num_steps = 6'], after FEW_LANGUAGES unless `all_languages`."""
  if isinstance(bindings, Mapping):
    bindings = [f"{k} = {v}" for k, v in bindings.items()]
  return [
    f"--gin_file={QUICKSTART}",
    *(f"--gin_file={f}" for f in gin_files),
    f"--workdir={workdir}",
    *(() if all_languages else FEW_LANGUAGE_FLAGS),
  ] + [f"--gin_bindings={b}" for b in bindings]


def tiny_step(**overrides):
  """A TrainStep of the tiny model, built with keyword arguments: warmup 1, 10 steps, the
  default rules, on one CPU device unless `mesh` is given; any argument may be overridden."""
  import jax

  from polylm_jax import sharding
  from polylm_jax.config import PRESETS
  from polylm_jax.optimizer import OptimizerConfig
  from polylm_jax.trainer.step import TrainStep

  kwargs: dict[str, Any] = dict(
    model_config=PRESETS["tiny"],
    optimizer_config=OptimizerConfig(warmup_steps=1),
    rules=sharding.DEFAULT_RULES,
    total_steps=10,
  )
  kwargs.update(overrides)
  if "mesh" not in kwargs:
    kwargs["mesh"] = sharding.make_mesh(sharding.MeshConfig(1, 1, 1), jax.devices()[:1])
  return TrainStep(**kwargs)


# A short run that saves a checkpoint every 2 steps and keeps 5 (the fault-injection tests).
CHECKPOINTED = {
  **SHORT,
  "TrainerConfig.eval_every": 0,
  "TrainerConfig.log_every": 2,
  "CheckpointConfig.every_steps": 2,
  "CheckpointConfig.keep_last": 5,
}


def checkpointed_args(workdir, steps: int, **extra) -> list[str]:
  """train_args of a `steps`-step CHECKPOINTED run, `extra` bindings on top."""
  return train_args(workdir, {**CHECKPOINTED, "TrainerConfig.num_steps": steps, **extra})
