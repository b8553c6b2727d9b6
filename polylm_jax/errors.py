"""The exceptions a user of the library tells apart, in one small hierarchy.

Library code raises these (never `SystemExit`); the command-line modules turn them into one line
and an exit status. Each also derives from the built-in type callers caught before the hierarchy
existed (ValueError for a setting or input that does not fit, RuntimeError for a failure), so
`except ValueError` keeps working.

    PolyLMError
      ConfigError                a setting that cannot be honoured (names the setting)
        CheckpointMismatchError  a checkpoint that does not fit the model, optimizer or data
        DataStateMismatchError   a saved data state the configured pipeline cannot take
        WorkdirError             a --workdir that cannot be used (not writable, not shared, locked)
          WorkdirLockedError     another trainer holds the workdir
      DataError                  input data that cannot be used
        MissingDataError         a benchmark's data is not in the local cache
      CheckpointError            a checkpoint that cannot be read or written
        CorruptCheckpointError   proven damaged (files missing, truncated, undecodable)
        CheckpointReadError      unreadable for a reason that says nothing about its files
        NoUsableCheckpointError  history but nothing to resume from
        CheckpointSaveError      a save that failed (names the step and what is intact)
      ExportError                an export or import that cannot be written or read
      TrainingError              a run that cannot go on
        NonFiniteError           the loss or gradients became NaN/inf
"""

from __future__ import annotations


class PolyLMError(Exception):
  """Base of every error this package raises on purpose; the message is what a user sees."""

  exit_status = 1  # what a command exits with; 2: a setting found wrong before anything was built


class ConfigError(PolyLMError, ValueError):
  """A setting that cannot be honoured; the message names the setting and why."""

  exit_status = 2


class CheckpointMismatchError(ConfigError):
  """A checkpoint that does not fit the configuration (model, optimizer chain, data settings):
  a configuration change, never damage; nothing is moved."""

  exit_status = 1


class DataStateMismatchError(ConfigError):
  """A saved data-iterator state that does not fit the configured pipeline (another stream count,
  another pipeline structure): a configuration change, not damage."""

  exit_status = 1


class WorkdirError(ConfigError):
  """A --workdir that cannot be used: not a directory, not writable, not shared between hosts."""


class WorkdirLockedError(WorkdirError, RuntimeError):
  """Another trainer holds the workdir's lock."""

  exit_status = 1


class DataError(PolyLMError, ValueError):
  """Input data that cannot be used; the message names the file or task."""


class MissingDataError(DataError, RuntimeError):
  """A benchmark's data is not in the local dataset cache (fetch it first)."""


class CheckpointError(PolyLMError, RuntimeError):
  """A checkpoint that cannot be read or written."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint (or its data state) proven damaged: files missing, truncated or undecodable."""


class CheckpointReadError(CheckpointError):
  """A checkpoint that could not be read for a reason that says nothing about its files (a
  storage error, a timeout), after retries: reported, never moved."""


class NoUsableCheckpointError(CheckpointError):
  """A workdir with checkpoint history but nothing to resume from: never a silent fresh start."""


class CheckpointSaveError(CheckpointError):
  """A save that failed; the message names the step and the checkpoints still intact."""


class ExportError(PolyLMError, RuntimeError):
  """An export or import that cannot be written or read."""


class TrainingError(PolyLMError, RuntimeError):
  """A run that cannot go on."""


class NonFiniteError(TrainingError):
  """The loss or the gradients became NaN or infinite."""
