"""One trainer per workdir: `<workdir>/LOCK` (local: flock + heartbeat; object storage: an object
created only if absent), and the check that every host of a multi-host run sees the same workdir."""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import secrets
import socket
import sys
import threading
import time
import uuid

from polylm_jax.errors import WorkdirError, WorkdirLockedError
from polylm_jax.io import storage

_HELD: dict[str, "WorkdirLock"] = {}  # locks this process holds, by path (re-entrant)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`<workdir>/LOCK`, held by process 0 for the whole run.

  The file says who holds it (host, pid, start time, command); the holder keeps an OS lock (flock)
  on it and refreshes its modification time every `heartbeat_s`. A second trainer refuses to start
  with a message naming the holder. A lock left by a crashed trainer is stale and taken over, with a
  warning: on the same host when its process is gone or holds no flock, from another host (a shared
  filesystem) when its heartbeat is older than `stale_after_s`.
  """

  NAME = "LOCK"

  def __init__(
    self, workdir: str | os.PathLike, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0
  ):
    self.path = pathlib.Path(workdir).absolute() / self.NAME
    self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
    self._fd: int | None = None
    self._token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._depth = 0
    self._started = datetime.datetime.now().isoformat(timespec="seconds")

  def __enter__(self) -> "WorkdirLock":
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> None:
    held = _HELD.get(str(self.path))
    if held is not None:  # this process already holds it (e.g. the CLI, then the loop)
      held._depth += 1
      self._depth = -1  # marks this object as a nested handle
      return
    self._take()
    self._depth = 1
    _HELD[str(self.path)] = self
    self._thread = threading.Thread(target=self._heartbeat, name="workdir-lock", daemon=True)
    self._thread.start()

  def _take(self) -> None:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._read()
        reason = self._stale_reason(holder)
        if reason is None:
          raise WorkdirLockedError(self._in_use_message(holder)) from None
        self._break(holder, reason)
        continue
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      os.write(fd, (json.dumps(self._info()) + "\n").encode())
      os.fsync(fd)
      self._fd = fd
      return
    raise WorkdirLockedError(f"could not take the lock {self.path}: it keeps changing hands")

  def release(self) -> None:
    if self._depth == -1:  # nested handle
      held = _HELD.get(str(self.path))
      if held is not None:
        held._depth -= 1
      self._depth = 0
      return
    if self._depth <= 0:
      return
    self._depth -= 1
    if self._depth > 0:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    _HELD.pop(str(self.path), None)
    self._give_back()

  def _info(self) -> dict:
    return {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "token": self._token,
      "started": self._started,
      "command": " ".join(sys.argv)[:500],
    }

  def _give_back(self) -> None:
    assert self._fd is not None
    holder = self._read()
    if holder is not None and holder.get("token") == self._token:  # only ever our own lock
      with contextlib.suppress(FileNotFoundError):
        self.path.unlink()
    os.close(self._fd)
    self._fd = None

  # --- internals ---------------------------------------------------------------------------
  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      with contextlib.suppress(OSError):
        os.utime(self.path)

  def _read(self) -> dict | None:
    try:
      text = self.path.read_text()
      return dict(json.loads(text), _mtime=self.path.stat().st_mtime)
    except (OSError, ValueError, TypeError):
      return None

  def _stale_reason(self, holder: dict | None) -> str | None:
    if holder is None:
      # Unreadable: a holder that died between creating and writing it, or is writing right now.
      try:
        age = time.time() - self.path.stat().st_mtime
      except FileNotFoundError:
        return "it disappeared"
      return f"it is unreadable and {age:.0f} s old" if age > 10 else None
    if holder.get("host") == socket.gethostname():
      try:
        pid = int(holder.get("pid", -1))
      except (TypeError, ValueError):  # not written by a trainer: no process can hold it
        return f"it names no process (pid {holder.get('pid')!r})"
      if not _pid_alive(pid):
        return f"its process {holder.get('pid')} is not running"
      if self._flock_free():
        return f"process {holder.get('pid')} does not hold it (the pid was reused)"
      return None
    age = time.time() - holder["_mtime"]
    if age > self.stale_after_s:
      return f"its holder on {holder.get('host')} has not refreshed it for {age:.0f} s"
    return None

  def _flock_free(self) -> bool:
    try:
      fd = os.open(self.path, os.O_RDONLY)
    except FileNotFoundError:
      return True
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
        return False
      raise
    finally:
      os.close(fd)
    return True

  def _break(self, holder: dict | None, reason: str) -> None:
    now = self._read()
    if now is not None and holder is not None and now.get("token") != holder.get("token"):
      return  # someone else took it over in the meantime: look again
    logging.warning("workdir lock %s is stale (%s): taking it over", self.path, reason)
    with contextlib.suppress(FileNotFoundError):
      self.path.unlink()

  def _in_use_message(self, holder: dict | None) -> str:
    if holder is None:
      who = "a trainer that is starting right now"
    else:
      who = (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')} "
        f"({holder.get('command')})"
      )
    return (
      f"workdir {os.path.dirname(self.path)} is in use by another trainer: {who}. Two runs must "
      f"not share a workdir: wait for that run or stop it, or choose another --workdir. If that "
      f"trainer is gone, delete {self.path}."
    )


def check_shared_workdir(workdir: str) -> None:
  """On a multi-host run, every host must see the same workdir (checkpoints are written by all
  hosts, data states and the lock are read across hosts): process 0 writes a probe file there and
  every process looks for it. All processes learn the outcome, so a workdir that is not shared
  stops every host with the same message instead of leaving some waiting forever."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  if jax.process_count() == 1:
    return
  token = int(multihost_utils.broadcast_one_to_all(np.int32(secrets.randbits(31))))
  probe = storage.join(workdir, f".shared-check-{token:08x}")
  lead = jax.process_index() == 0
  if lead:
    storage.write_text(probe, socket.gethostname())
  multihost_utils.sync_global_devices("polylm_workdir_probe_written")
  seen = multihost_utils.process_allgather(np.int32(storage.exists(probe)))
  if lead:
    storage.remove(probe)  # the probe this process wrote a moment ago, nothing else
  missing = [i for i, s in enumerate(np.asarray(seen).reshape(-1)) if not s]
  if missing:
    raise WorkdirError(
      f"--workdir={workdir} is not shared between the hosts: process(es) {missing} cannot see the "
      f"file process 0 wrote there. Checkpoints, data states and the run's lock must be on a "
      f"filesystem every host sees (NFS, Filestore, Lustre), or in a bucket (--workdir=gs://...)"
    )


class RemoteWorkdirLock(WorkdirLock):
  """`<workdir>/LOCK` on object storage. There is no flock there: the object says who holds it
  and when it last refreshed it (`heartbeat`, every `heartbeat_s`), and a lock not refreshed for
  `stale_after_s` is taken over with a warning. It is created only if absent (a generation
  precondition on GCS: of two trainers starting at once, one gets it), then read back to check that
  it holds this trainer's token."""

  def __init__(
    self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0
  ) -> None:
    super().__init__("/", heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)
    self.url = storage.join(workdir, self.NAME)
    self.path = self.url  # type: ignore[assignment]  # (the base class's messages name it)

  def _record(self) -> bytes:
    return (json.dumps(dict(self._info(), heartbeat=time.time())) + "\n").encode()

  def _take(self) -> None:
    fs, p = storage.filesystem(self.url)
    holder = self._read()
    if holder is not None or storage.exists(self.url):
      reason = self._stale_reason(holder)
      if reason is None:
        raise WorkdirLockedError(self._in_use_message(holder))
      logging.warning("workdir lock %s is stale (%s): taking it over", self.url, reason)
      fs.pipe_file(p, self._record())
    else:
      try:
        fs.pipe_file(p, self._record(), mode="create")
      except FileExistsError:
        raise WorkdirLockedError(self._in_use_message(self._read())) from None
    now = self._read()
    if now is None or now.get("token") != self._token:
      raise WorkdirLockedError(self._in_use_message(now))

  def _give_back(self) -> None:
    holder = self._read()
    if holder is not None and holder.get("token") == self._token:  # only ever our own lock
      storage.remove(self.url)

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._read()
        if holder is not None and holder.get("token") != self._token:
          logging.error("workdir lock %s was taken over by %s", self.url, holder.get("host"))
          return
        storage.write_bytes(self.url, self._record())
      except OSError as e:
        logging.warning("could not refresh the workdir lock %s: %s", self.url, e)

  def _read(self) -> dict | None:
    try:
      return dict(json.loads(storage.read_text(self.url)))
    except (OSError, ValueError, TypeError):
      return None

  def _stale_reason(self, holder: dict | None) -> str | None:
    if holder is None:
      return "it is unreadable"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_after_s:
      return f"its holder on {holder.get('host')} has not refreshed it for {age:.0f} s"
    return None


def workdir_lock(workdir: str | os.PathLike) -> WorkdirLock:
  """The trainer's lock on its workdir, local or on object storage."""
  if storage.is_remote(workdir):
    return RemoteWorkdirLock(os.fspath(workdir))
  return WorkdirLock(workdir)
