"""Work started now in a background thread and collected later (its error raised by whoever
collects it, in their thread): the trainer's first batch, a curriculum's next stage."""

from __future__ import annotations

import threading
from typing import Any, Callable


class Background:
  def __init__(self, fn: Callable[[], Any], name: str):
    self._result: Any = None
    self._error: BaseException | None = None

    def run():
      try:
        self._result = fn()
      except BaseException as e:  # raised again by result(), in the collecting thread
        self._error = e

    self._thread = threading.Thread(target=run, name=name, daemon=True)
    self._thread.start()

  def wait(self) -> None:
    """Waits for the work without collecting it: a run that fails before it needs the result
    leaves nothing running (a thread still inside TensorFlow when the interpreter exits aborts
    the process)."""
    self._thread.join()

  def result(self) -> Any:
    """Waits for the work (usually long finished) and returns its value or raises its error."""
    self.wait()
    if self._error is not None:
      raise self._error
    return self._result
