"""What a command-line run prints before its first step: only what the user needs.

- TensorFlow (the data loader) prints C++ notices at import, before any log level applies
  (oneDNN, "Could not find cuda drivers"): `import_tensorflow()` imports it with those known
  notices filtered out; anything else it prints still comes through.
- TensorFlow's probe for a GPU ("failed call to cuInit" on a machine without one) likewise.
- seqio's advice to cache FunctionDataSource tasks (it concerns shuffling after a restart; this
  trainer restores the data iterator exactly) and its note that SentencePiece defines no pad id
  (PAD is id 0 here, framing.py) are dropped from the log.
- On a machine with neither a GPU nor a TPU, `choose_platform()` runs JAX on the CPU explicitly
  (and says so once), so an installed libtpu does not print its failed TPU probe (the "No jellyfish
  device found" lines). An explicit JAX_PLATFORMS is always respected.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import sys
import tempfile

# Lines TensorFlow prints at import on machines without a GPU: expected, not errors.
_BENIGN = (
  "All log messages before absl::InitializeLog()",
  "oneDNN custom operations are on",
  "Could not find cuda drivers",
  "TF-TRT Warning",
  "Unable to register cu",
)


def _no_gpu() -> bool:
  return not glob.glob("/dev/nvidia[0-9]*")


@contextlib.contextmanager
def filtered_stderr():
  """Captures file descriptor 2 (C++ output too) and re-emits the lines that are not benign."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as capture:
    os.dup2(capture.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      capture.seek(0)
      benign = _BENIGN + (("failed call to cuInit",) if _no_gpu() else ())
      for line in capture.read().decode("utf-8", errors="replace").splitlines():
        if line.strip() and not any(b in line for b in benign):
          print(line, file=sys.stderr)


def summary(doc: str | None) -> str:
  """A command's --help description: its module docstring's first paragraph, on one line."""
  return " ".join((doc or "").split("\n\n")[0].split())


def import_tensorflow():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  with filtered_stderr():
    import tensorflow

    tensorflow.config.list_physical_devices("GPU")  # its device probe prints now, filtered
  return tensorflow


_SEQIO_NOISE = (
  "Using an uncached FunctionDataset for training",
  "T5 library uses PAD_ID=0, which is different from the sentencepiece",
)


def quiet_seqio(record: logging.LogRecord) -> bool:
  """A logging filter (for the root and absl loggers) dropping seqio's two notices above."""
  message = record.getMessage()
  return not any(n in message for n in _SEQIO_NOISE)


def choose_platform() -> None:
  """Before JAX's first backend use (jax may already be imported)."""
  import jax

  if os.environ.get("JAX_PLATFORMS") is not None or getattr(jax.config, "jax_platforms", None):
    return
  accelerators = (
    glob.glob("/dev/nvidia[0-9]*") + glob.glob("/dev/accel[0-9]*") + glob.glob("/dev/vfio/[0-9]*")
  )
  if not accelerators:
    jax.config.update("jax_platforms", "cpu")
    logging.info(
      "no GPU or TPU device on this machine: JAX runs on the CPU (set JAX_PLATFORMS "
      "to choose another platform)"
    )


def _not_gin_path_noise(record: logging.LogRecord) -> bool:
  # gin looks for an include in package resources before its search path and logs an ERROR when
  # it is not there, though the include is then found: drop that misleading line (gin logs it
  # through the root logger, absl's handlers through "absl").
  # ... and an INFO line per include it finds ("system_path_file_exists").
  return not (
    record.pathname.endswith("resource_reader.py")
    and ("Path not found" in str(record.msg) or "system_path_file_exists" in str(record.msg))
  )


@contextlib.contextmanager
def only_warnings():
  """INFO lines held back while inside (an interactive exchange on the console)."""
  loggers = [logging.getLogger(), logging.getLogger("absl")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(max(logger.level, logging.WARNING))
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def _late_read_on_closed_loop(info) -> bool:
  """After a checkpoint read fails, Orbax closes its event loop while TensorStore still finishes
  the other reads; each then reports `Event loop is closed` from asyncio, after the real error."""
  tb = info.exc_traceback
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return (
    isinstance(info.exc_value, RuntimeError)
    and str(info.exc_value) == "Event loop is closed"
    and tb is not None
    and tb.tb_frame.f_code.co_filename.replace(os.sep, "/").endswith("asyncio/base_events.py")
  )


def quiet_closed_loop_reports() -> None:
  """Drops those reports (sys.unraisablehook); every other unraisable error is shown as before."""
  shown = sys.unraisablehook
  if getattr(shown, "polylm_filter", False):
    return

  def hook(info) -> None:
    if not _late_read_on_closed_loop(info):
      shown(info)

  hook.polylm_filter = True  # type: ignore[attr-defined]
  sys.unraisablehook = hook


def _drop_console_handlers(logger: logging.Logger) -> None:
  """Removes the plain console handlers that imported libraries installed (handlers of other
  kinds, e.g. a test's log capture, stay)."""
  for handler in list(logger.handlers):
    if type(handler) is logging.StreamHandler:  # noqa: E721 (exactly the plain console handler)
      logger.removeHandler(handler)


def one_handler_each(*names: str) -> None:
  """Libraries that give their logger a console handler of its own (huggingface_hub) and also
  pass its records on to the root's: each line shown once, formatted as the others."""
  for name in names:
    _drop_console_handlers(logging.getLogger(name))


def _not_lm_eval_default_notice(record: logging.LogRecord) -> bool:
  # lm-eval warns, per task it loads, that its own YAMLs leave a metric's aggregation and
  # direction to the defaults (mean, higher is better), and, per task with a custom_dataset (the
  # shipped translation tasks), how its own command line passes --metadata: nothing a user of
  # polylm-eval can act on.
  if not record.name.startswith("lm_eval"):
    return True
  msg = str(record.msg)
  defaults = "is defined, but" in msg and (
    "aggregation is not" in msg or "higher_is_better is not" in msg
  )
  return not (defaults or "Custom kwargs can be passed to `--metadata`" in msg)


def quiet_logging() -> None:
  """One console handler on the root logger (replacing plain stream handlers that imported
  libraries installed; handlers of other kinds, e.g. a test's log capture, stay), and no
  `Event loop is closed` reports after a failed checkpoint read."""
  quiet_closed_loop_reports()
  root = logging.getLogger()
  _drop_console_handlers(root)
  handler = logging.StreamHandler()
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  handler.addFilter(_not_gin_path_noise)
  handler.addFilter(_not_lm_eval_default_notice)
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  logging.getLogger("absl").setLevel(logging.WARNING)  # seqio logs every task it opens at INFO
  # lm-eval's per-call INFO lines (seeds, "Selected tasks", "Building contexts") and datasets'
  # "TensorFlow version ... available": polylm-eval logs its own progress per task.
  for chatty in ("lm_eval", "lm-eval", "datasets"):
    logging.getLogger(chatty).setLevel(logging.WARNING)
  for logger in (root, logging.getLogger("absl")):
    for noise in (_not_gin_path_noise, quiet_seqio):
      if noise not in logger.filters:
        logger.addFilter(noise)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before tensorflow is first imported
