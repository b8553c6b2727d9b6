"""Running a sweep's arms: checked all together first, then trained and evaluated one after
another (each arm is an ordinary polylm-train run in its own workdir, so a finished arm is
skipped and an interrupted one resumes), or printed as one launcher job per arm.

    <sweep dir>/sweep.json        the sweep, recorded at the first start
    <sweep dir>/arms/<arm>/       each arm's training workdir
    <sweep dir>/eval/<arm>/       each arm's polylm-eval results (heldout + the sweep's tasks)
    <sweep dir>/report/           report.md and its charts (report.py)
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import subprocess
import sys
from typing import Callable, Sequence

from polylm_jax.errors import ConfigError, TrainingError, WorkdirError
from polylm_jax.io import storage
from polylm_jax.sweep import spec

LAUNCHERS = ("slurm", "gke", "tpu_vm")


def arm_dir(sweep_dir: str, arm: spec.Arm) -> str:
  return storage.join(sweep_dir, "arms", arm.name)


def eval_dir(sweep_dir: str, arm: spec.Arm) -> str:
  return storage.join(sweep_dir, "eval", arm.name)


def tokenizer_path(sweep_dir: str, vocab_size: int) -> str:
  return storage.join(sweep_dir, "tokenizers", f"vocab={vocab_size}.model")


def arm_bindings(arm: spec.Arm, sweep_dir: str) -> list[str]:
  """The arm's bindings, with its tokenizer and model vocabulary for a vocabulary arm."""
  own = list(arm.bindings)
  if arm.vocab_size is not None:
    own += [
      f"train.tokenizer = '{tokenizer_path(sweep_dir, arm.vocab_size)}'",
      f"model_config.vocab_size = {arm.vocab_size}",
    ]
  return own


def train_args(sweep: spec.Sweep, arm: spec.Arm, sweep_dir: str) -> list[str]:
  """polylm-train's arguments for one arm."""
  return (
    [f"--gin_file={f}" for f in sweep.gin_files]
    + [f"--workdir={arm_dir(sweep_dir, arm)}"]
    + [f"--gin_bindings={b}" for b in arm_bindings(arm, sweep_dir)]
  )


def tokenizer_args(sweep: spec.Sweep, sweep_dir: str, vocab_size: int) -> list[str]:
  """polylm-tokenizer's arguments for a vocabulary arm's tokenizer."""
  return [
    sweep.tokenizer_command,
    *sweep.tokenizer_flags,
    f"--vocab_size={vocab_size}",
    f"--out={tokenizer_path(sweep_dir, vocab_size)}",
  ]


def eval_args(sweep: spec.Sweep, arm: spec.Arm, sweep_dir: str) -> list[str]:
  tasks = ",".join(["heldout", *sweep.eval_tasks])
  return [
    "run",
    f"--workdir={arm_dir(sweep_dir, arm)}",
    f"--out={eval_dir(sweep_dir, arm)}",
    f"--tasks={tasks}",
    f"--heldout={sweep.heldout}",
  ]


def _claim(sweep: spec.Sweep, sweep_dir: str) -> None:
  """The directory is this sweep's: new (sweep.json written), or holding the same sweep. Another
  sweep's, or a directory that is not a sweep's, is refused with nothing changed."""
  record = storage.join(sweep_dir, "sweep.json")
  given = sweep.to_json()
  if storage.exists(record):
    saved = json.loads(storage.read_text(record))
    changed = spec.differences(saved, given)
    if changed:
      raise ConfigError(
        f"{sweep_dir} holds another sweep (sweep.json): " + "; ".join(changed) + ". Give "
        "another directory for this sweep, or the sweep file it was started with"
      )
    return
  if storage.isdir(sweep_dir) and storage.listdir(sweep_dir):
    raise WorkdirError(
      f"{sweep_dir} is not empty and holds no sweep.json: not a sweep directory (a sweep "
      f"writes only into a new directory or its own)"
    )
  storage.makedirs(sweep_dir)
  storage.write_text(record, json.dumps(given, indent=2) + "\n")


def check_arms(sweep: spec.Sweep, sweep_dir: str, arms: Sequence[spec.Arm]) -> None:
  """Every arm's configuration parses, and the configurables its grid bindings set can be built
  with its values: a typo or a value of the wrong kind stops the sweep before anything trains."""
  import gin

  from polylm_jax.train import gin_setup

  gin_setup.register_configurables()
  try:
    for arm in arms:
      try:
        gin_setup.parse_gin(list(sweep.gin_files), arm_bindings(arm, sweep_dir))
      except ConfigError as e:
        raise ConfigError(f"arm {arm.name}: {e}") from e
      for key in arm.values:
        selector = key.rpartition(".")[0]
        scope, _, name = selector.rpartition("/")
        try:
          with gin.config_scope(scope or None):
            gin.get_configurable(name)()
        except TypeError as e:
          if "missing" in str(e) and "required" in str(e):
            continue  # an entry point with arguments of its own (train): parsing is the check
          raise ConfigError(f"arm {arm.name}: {key} = {arm.values[key]!r}: {e}") from e
        except ValueError as e:
          raise ConfigError(f"arm {arm.name}: {key} = {arm.values[key]!r}: {e}") from e
  finally:
    gin.clear_config()


def prepare(sweep: spec.Sweep, sweep_dir: str) -> list[spec.Arm]:
  """Checks everything that can be checked, then claims the directory; returns the arms."""
  arms = spec.arms(sweep)
  check_arms(sweep, sweep_dir, arms)
  _claim(sweep, sweep_dir)
  return arms


def _run(what: str, argv: list[str]) -> None:
  logging.info("sweep: %s: %s", what, shlex.join(argv))
  status = subprocess.run(argv, check=False).returncode
  if status != 0:
    raise TrainingError(
      f"{what} exited with status {status} (its output is above); fix the cause and run "
      f"polylm-sweep again: finished arms are skipped, this one resumes"
    )


def run_arms(
  sweep: spec.Sweep,
  sweep_dir: str,
  arms: Sequence[spec.Arm],
  *,
  python: str = sys.executable,
  on_arm: Callable[[spec.Arm], None] | None = None,
) -> None:
  """Trains and evaluates each arm in turn (polylm-train resumes an interrupted arm and returns
  at once for a finished one; polylm-eval reuses finished results)."""
  make_tokenizers(sweep, sweep_dir, python=python)
  for i, arm in enumerate(arms, 1):
    logging.info("sweep: arm %d of %d: %s", i, len(arms), arm.name)
    _run(
      f"arm {arm.name}: polylm-train",
      [python, "-m", "polylm_jax.train"] + train_args(sweep, arm, sweep_dir),
    )
    _run(
      f"arm {arm.name}: polylm-eval",
      [python, "-m", "polylm_jax.eval"] + eval_args(sweep, arm, sweep_dir),
    )
    if on_arm is not None:
      on_arm(arm)


def make_tokenizers(sweep: spec.Sweep, sweep_dir: str, *, python: str = sys.executable) -> None:
  """Each vocabulary arm's tokenizer, trained once (polylm-tokenizer writes it atomically, so
  an interrupted one is trained again)."""
  for size in sweep.vocab_sizes:
    if not storage.exists(tokenizer_path(sweep_dir, size)):
      _run(
        f"tokenizer vocab={size}: polylm-tokenizer",
        [python, "-c", _TOKENIZER_MAIN] + tokenizer_args(sweep, sweep_dir, size),
      )


_TOKENIZER_MAIN = "from polylm_jax.data.tokenizer_cli import console_main; console_main()"


def _job_name(sweep_dir: str, arm: spec.Arm) -> str:
  """A name every launcher takes (GKE: lowercase letters, digits and '-', at most 63)."""
  base = re.sub(r"[^a-z0-9]+", "-", f"{storage.name(sweep_dir)}-{arm.name}".lower()).strip("-")
  if len(base) <= 50:
    return base
  import hashlib

  return f"{base[:41].rstrip('-')}-{hashlib.sha256(base.encode()).hexdigest()[:8]}"


def launch_commands(
  sweep: spec.Sweep, sweep_dir: str, arms: Sequence[spec.Arm], launcher: str, extra: Sequence[str]
) -> list[str]:
  """One shell command per arm that submits its training to `launcher` (launch/README.md); the
  sweep directory must be one the cluster's hosts see (a bucket or a shared filesystem)."""
  if launcher not in LAUNCHERS:
    raise ConfigError(f"--launch={launcher!r} is not one of {LAUNCHERS}")
  out = []
  for arm in arms:
    args = train_args(sweep, arm, sweep_dir)
    gin_files = [a.split("=", 1)[1] for a in args if a.startswith("--gin_file=")]
    rest = [a for a in args if not a.startswith(("--gin_file=", "--workdir="))]
    name = _job_name(sweep_dir, arm)
    if launcher == "slurm":
      argv = ["sbatch", f"--job-name={name}", *extra, "launch/slurm.sbatch"]
      argv += [arm_dir(sweep_dir, arm), *gin_files, "--", *rest]
    elif launcher == "gke":
      argv = ["python", "launch/gke_jobset.py", f"--name={name}", *extra]
      argv += [
        f"--workdir={arm_dir(sweep_dir, arm)}",
        *[f"--gin_file={f}" for f in gin_files],
        *rest,
      ]
    else:
      argv = ["bash", "launch/tpu_vm.sh", *extra, f"--workdir={arm_dir(sweep_dir, arm)}"]
      argv += [*[f"--gin_file={f}" for f in gin_files], *rest]
    out.append(shlex.join(argv))
  return out
