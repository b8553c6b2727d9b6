"""Errors of the data layer that callers tell apart (no TensorFlow needed to import them)."""


class DataStateMismatchError(ValueError):
  """A saved data-iterator state that does not fit the configured pipeline (another stream count,
  another pipeline structure): a configuration change, not damage."""
