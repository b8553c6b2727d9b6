"""Safe writes on a local disk: a file appears complete or not at all, and nothing is deleted to
make room (damaged or replaced data is moved aside)."""

from __future__ import annotations

import contextlib
import datetime
import os
import pathlib
import tempfile
import uuid


def timestamp() -> str:
  return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _usual_mode(path: str) -> None:
  """The permissions a plain open() would give (0666 less the umask): mkstemp's 0600 would make
  a written config, tokenizer or model unreadable to the user's colleagues and servers."""
  os.chmod(path, 0o666 & ~umask())


def umask() -> int:
  # Read, not set-and-restore: os.umask would change it for every thread for a moment.
  with contextlib.suppress(OSError, ValueError):
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
      if line.startswith("Umask:"):
        return int(line.split()[1], 8)
  return 0o022


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` via a temporary file in the same directory and an atomic
  rename."""
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
  """Writes `data` to `path` via a temporary file in the same directory and an atomic rename."""
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    _usual_mode(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


def move_aside(path: str | os.PathLike, holding_dir: str | os.PathLike, label: str) -> pathlib.Path:
  """Moves `path` into `holding_dir` as `<label>-<time>` (never deletes); returns the new path."""
  holding = pathlib.Path(holding_dir)
  holding.mkdir(parents=True, exist_ok=True)
  target = holding / f"{label}-{timestamp()}"
  while target.exists():
    target = holding / f"{label}-{timestamp()}-{uuid.uuid4().hex[:6]}"
  os.rename(path, target)
  return target


def check_apart(out: str | os.PathLike, source: str | os.PathLike, *, what: str = "--out") -> None:
  """An output must neither be its source, nor inside it, nor contain it."""
  o, s = pathlib.Path(out).resolve(), pathlib.Path(source).resolve()
  if o == s:
    raise ValueError(f"{what}={out} is the source itself ({source}); write somewhere else")
  if s in o.parents:
    raise ValueError(f"{what}={out} is inside the source {source}; write somewhere else")
  if o in s.parents:
    raise ValueError(
      f"{what}={out} contains the source {source}; replacing it would delete the "
      f"source; write somewhere else"
    )
