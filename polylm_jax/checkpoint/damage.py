"""Reading a checkpoint: what its errors are, and which read errors prove it damaged.

Only a checkpoint proven damaged (files missing, truncated or undecodable) is ever moved aside
(manager.py, to corrupt/). A read that fails for another reason (a 503 or a timeout from
object storage) is tried again, then reported; a configuration that does not fit
(fit.CheckpointMismatchError) passes through at once. With several processes, each reads its
own shards and data streams, and all act on one outcome (agree_on_restore).
"""

from __future__ import annotations

import json
import logging
import time

import jax
import numpy as np

from polylm_jax.checkpoint.fit import CheckpointMismatchError
from polylm_jax.errors import CheckpointReadError, CorruptCheckpointError


def _is_resource_error(e: BaseException) -> bool:
  """Out of memory while restoring says nothing about the checkpoint: not a reason to move it."""
  return isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e)


# What a damaged checkpoint's read fails with: files that are missing, cut short or do not decode.
# Anything else (a 503 from object storage, a timeout, a broken connection) proves nothing about
# the files: the read is retried, then reported, and the checkpoint stays where it is.
_DAMAGE_TYPES: tuple[type[BaseException], ...] = (
  FileNotFoundError,
  json.JSONDecodeError,
  UnicodeDecodeError,
  EOFError,
)
_DAMAGE_WORDS = (
  "DATA_LOSS",
  "NOT_FOUND",
  "No such file",
  "not found",
  "does not exist",
  "Error reading",
  "Error decoding",
  "decompress",
  "corrupt",
  "truncated",
  "Truncated",
  "unexpected end",
  "Read less bytes",
  "Unexpected end",
  "metadata missing",
  "Expecting value",
  "Failed to decode",
  "checksum",
)
_TRANSIENT_WORDS = (
  "UNAVAILABLE",
  "DEADLINE_EXCEEDED",
  "Service Unavailable",
  "timed out",
  "Timeout",
  "Connection",
  "temporarily",
  " 429",
  " 500",
  " 502",
  " 503",
  " 504",
)
READ_ATTEMPTS = 3  # a failed read is tried this many times in all ...
READ_RETRY_DELAY_S = 2.0  # ... waiting this long, then twice as long, between tries


def _chain(e: BaseException):
  while e is not None:
    yield e
    e = e.__cause__ or e.__context__  # type: ignore[assignment]


def proves_damage(e: BaseException) -> bool:
  """Does this read error show the checkpoint's files are damaged (not storage misbehaving)?"""
  errors = list(_chain(e))
  text = " ".join(f"{type(x).__name__}: {x}" for x in errors)
  if isinstance(e, (ConnectionError, TimeoutError)) or any(w in text for w in _TRANSIENT_WORDS):
    return False
  return any(isinstance(x, _DAMAGE_TYPES) for x in errors) or any(w in text for w in _DAMAGE_WORDS)


def _first_line(e: BaseException) -> str:
  """The error a user can act on: of a chain (Orbax wraps TensorStore's errors in a generic
  one), the innermost that names damage, else the outermost; its first line."""
  shown = next(
    (
      x
      for x in reversed(list(_chain(e)))
      if isinstance(x, _DAMAGE_TYPES) or any(w in str(x) for w in _DAMAGE_WORDS)
    ),
    e,
  )
  return f"{type(shown).__name__}: {str(shown).splitlines()[0][:300] if str(shown) else ''}"


def _read(where, part: str, fn):
  """`fn()`, tried again after a failure that does not prove damage. Damage raises
  CorruptCheckpointError; a failure that persists without proving damage CheckpointReadError;
  out of memory and configuration mismatches pass through."""
  for attempt in range(1, READ_ATTEMPTS + 1):
    try:
      return fn()
    except (CheckpointMismatchError, KeyboardInterrupt):
      raise
    except Exception as e:
      if _is_resource_error(e):
        raise
      if proves_damage(e):
        raise CorruptCheckpointError(
          f"checkpoint {where} is unreadable: {part} ({_first_line(e)})"
        ) from e
      if attempt == READ_ATTEMPTS:
        raise CheckpointReadError(
          f"checkpoint {where} could not be read: {part} ({_first_line(e)}; {READ_ATTEMPTS} "
          f"attempts). This does "
          f"not show the checkpoint is damaged, so nothing was moved: run again once the "
          f"storage answers"
        ) from e
      delay = READ_RETRY_DELAY_S * 2 ** (attempt - 1)
      logging.warning(
        "checkpoint %s: reading %s failed (%s); trying again in %.0f s",
        where,
        part,
        _first_line(e),
        delay,
      )
      time.sleep(delay)
  raise AssertionError("unreachable")


_RESTORED, _FAILED, _DAMAGED = 0, 1, 2


def agree_on_restore(step: int, where: str, error: Exception | None) -> None:
  """All processes act on one outcome of a checkpoint's restore, or they part ways (one moving
  it to corrupt/ and waiting there while another trains): damage found by any process counts
  for all (a process reads only its own shards and data streams); otherwise a failure on any
  process stops all. Raises this process's own error, or one naming the other processes'."""
  outcome = (
    _RESTORED
    if error is None
    else _DAMAGED
    if isinstance(error, CorruptCheckpointError)
    else _FAILED
  )
  worst = outcome
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    seen = multihost_utils.process_allgather(np.array([outcome], np.int32))
    worst = int(np.max(seen))
    if worst != outcome:
      logging.error(
        "checkpoint step %d: restored here, but another process found it %s",
        step,
        "damaged" if worst == _DAMAGED else "unreadable or not fitting",
      )
  if worst == outcome and error is not None:
    raise error
  if worst == _DAMAGED:
    raise CorruptCheckpointError(f"checkpoint {where}: another process found it damaged") from error
  if worst == _FAILED:
    raise CheckpointReadError(
      f"checkpoint {where} could not be restored on another process (see that process's log); "
      f"nothing was moved"
    ) from error
