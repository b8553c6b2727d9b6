"""`python -m polylm_jax.train` / `polylm-train`: parse gin, check the setup, run the loop.

Everything a run does is gin: `train.model`, `train.optimizer`, `train.mesh`, `train.data`,
`train.trainer` (see gin_configs/). A run writes to its workdir: checkpoints/ and data_state/
(resumable state), metrics.jsonl and eval_metrics.jsonl, tensorboard/, config.gin (the gin config
of the latest start, written once start-up succeeded) and operative_config.gin (every setting the
run used, written when it finishes).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import uuid

import gin

from polylm_jax import console, errors
from polylm_jax.errors import WorkdirError
from polylm_jax.io import locks, storage
from polylm_jax.train import gin_setup


def check_workdir(workdir: str) -> str:
  """A local directory (made if missing) or an object-storage URL (gs://bucket/run), written to
  and read back once, so a path the trainer cannot use stops it before anything is built."""
  if storage.is_remote(workdir):
    path = workdir.rstrip("/")
  else:
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):  # the nearest part of the path that exists
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      raise WorkdirError(f"--workdir={workdir}: {existing} is a file, not a directory")
  probe = storage.join(path, f".write-test-{uuid.uuid4().hex}")
  try:
    storage.makedirs(path)
    storage.write_text(probe, "ok")
    if storage.read_text(probe) != "ok":
      raise OSError(f"{probe} read back differently")
    storage.remove(probe)
  except (OSError, ValueError) as e:
    raise WorkdirError(f"--workdir={workdir} is not writable: {e}") from e
  return path


def join_run(args) -> None:
  """jax.distributed.initialize, bounded: a coordinator nobody can reach, or processes that never
  all start, end this process after --coordinator_timeout_s with a message (exit status 2) rather
  than a hang or the runtime's abort with a stack trace."""
  import threading

  import jax

  # CPU processes need a collectives backend to talk to each other; GPU/TPU ignore this setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  timeout = args.coordinator_timeout_s
  where = args.coordinator_address or "the coordinator found by cluster auto-detection"
  who = "this process" if args.process_id is None else f"process {args.process_id}"
  of = f" of {args.num_processes}" if args.num_processes else ""
  if args.process_id == 0:
    why = (
      "not every process connected to it (are all --num_processes processes started, with the "
      "same --coordinator_address?)"
    )
  else:
    why = (
      "the coordinator did not answer, or not every process joined (is process 0 running, is "
      "that host and port reachable from this host, and are all processes started?)"
    )
  message = (
    f"polylm-train: --distributed: {who}{of} did not join the run at {where} within "
    f"--coordinator_timeout_s={timeout}: {why}"
  )
  timer = threading.Timer(timeout, lambda: _die(message, 2))
  timer.daemon = True
  timer.start()
  try:  # the runtime's own deadline comes later, so the message above is what the user sees
    jax.distributed.initialize(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=timeout + 60,
    )
  finally:
    timer.cancel()


quiet_logging = console.quiet_logging  # (where it lived before: callers may import it here)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(prog="polylm-train", description=__doc__)
  parser.add_argument(
    "--gin_file",
    action="append",
    default=[],
    required=True,
    help="gin file (repeatable); relative paths also resolve under gin_configs/",
  )
  parser.add_argument(
    "--gin_bindings",
    action="append",
    default=[],
    help="a gin binding such as 'TrainerConfig.num_steps = 10' (repeatable)",
  )
  parser.add_argument(
    "--workdir",
    required=True,
    help="where checkpoints, metrics, TensorBoard events and config.gin go; a "
    "workdir with checkpoints is resumed",
  )
  parser.add_argument(
    "--start_over",
    action="store_true",
    help="begin a new run in a workdir that has checkpoints: the earlier run's "
    "files are moved to <workdir>/previous/<time>/ (nothing is deleted)",
  )
  parser.add_argument(
    "--distributed",
    action="store_true",
    help="multi-host: call jax.distributed.initialize() first (auto-detected on "
    "TPU pods and SLURM; else pass the three flags below)",
  )
  parser.add_argument("--coordinator_address", default=None, help="host:port of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  parser.add_argument(
    "--coordinator_timeout_s",
    type=int,
    default=300,
    help="multi-host: how long every process waits for the run to assemble before it stops, "
    "naming what is missing (default: %(default)s)",
  )
  args = parser.parse_args(argv)
  try:
    return _train(args)
  except errors.PolyLMError as e:
    if e.exit_status != 2:  # a run that started and failed: console_main reports it whole
      raise
    raise SystemExit(error_text(e)) from e  # a setting found wrong before anything was built


def error_text(e: BaseException) -> str:
  """An error's message on one line, with its notes; gin's "In call to configurable ..." lines
  left out (the message itself names the setting)."""
  return " ".join(
    line.strip()
    for line in [*str(e).splitlines(), *getattr(e, "__notes__", ())]
    if not line.strip().startswith("In call to configurable")
  )


def _train(args) -> dict:
  quiet_logging()
  console.choose_platform()
  if args.distributed:
    join_run(args)
  workdir = check_workdir(args.workdir)
  if args.distributed:
    locks.check_shared_workdir(workdir)
  train_fn = gin_setup.register_configurables()
  gin_setup.parse_gin(args.gin_file, args.gin_bindings)
  import jax

  lead = jax.process_index() == 0  # one writer per run, whatever the number of hosts
  # Taken before anything is built, so a second trainer on this workdir stops at once.
  with locks.workdir_lock(workdir) if lead else contextlib.nullcontext():
    result = train_fn(workdir=workdir, start_over=args.start_over)
    if lead:
      storage.write_text(storage.join(workdir, "operative_config.gin"), gin.operative_config_str())
  return result


def console_main() -> None:
  """Exit status 0 on success; otherwise the error is the last thing printed and the status is 1
  (2 for a configuration error found at start). The process exits without waiting for the data
  pipeline's threads, which would otherwise abort it ("terminate called ...", status 134)."""
  try:
    main(sys.argv[1:])
  except SystemExit as e:
    if e.code in (None, 0):
      raise
    _die(
      f"polylm-train: {e.code}" if isinstance(e.code, str) else None,
      e.code if isinstance(e.code, int) else 2,
    )
  except KeyboardInterrupt:
    _die("polylm-train: interrupted", 130)
  except BaseException as e:  # noqa: BLE001 (everything else: report it, then exit 1)
    logging.error("training failed", exc_info=True)
    # gin appends "In call to configurable ..." lines; the message itself names the setting.
    text = error_text(e) + gin_setup.hint(str(e))
    _die(f"polylm-train: error: {type(e).__name__}: {text}", 1)


def _die(message: str | None, code: int) -> None:
  logging.shutdown()
  sys.stdout.flush()
  if message:
    print(message, file=sys.stderr, flush=True)
  os._exit(code)
