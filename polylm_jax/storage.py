"""A run's files on a local disk or on object storage (gs://, s3://, ... through fsspec).

The trainer writes its workdir through this module, so a pod job needs no shared POSIX filesystem:
`--workdir=gs://bucket/run` works like a local directory. Orbax writes the checkpoints themselves
(tensorstore for arrays, etils.epath for metadata); `prepare` makes epath reach object storage
through fsspec like this module, so one client library and one set of credentials serve the whole
run.

What object storage does not give, and what is done instead:
- no rename: `move` copies, checks that every file arrived with its size, and only then removes the
  source (a failure leaves the source whole);
- no append: `AppendLog` keeps the file's text and uploads it whole at most every `upload_every_s`
  seconds and when closed (a crash loses at most that much of metrics.jsonl, never the checkpoint);
- no partly written objects: an upload becomes visible only when complete, which is what the
  local `files.atomic_write_bytes` gets from a temporary name and a rename;
- libraries that need a local directory (tf.data iterator checkpoints, TensorBoard event files)
  write into a local temporary directory that is uploaded (`upload_dir`) or downloaded first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Iterator

from polylm_jax import files

# How often logs kept locally for object storage (metrics.jsonl, TensorBoard) are uploaded.
UPLOAD_EVERY_S = 30.0


def is_remote(path: str | os.PathLike) -> bool:
  """A URL with a scheme other than file:// (gs://bucket/run, s3://..., memory://...)."""
  text = os.fspath(path)
  return "://" in text and not text.startswith("file://")


def join(base: str | os.PathLike, *parts: str) -> str:
  if is_remote(base):
    return "/".join([os.fspath(base).rstrip("/"), *parts])
  return os.path.join(os.fspath(base), *parts)


def name(path: str) -> str:
  return path.rstrip("/").rsplit("/", 1)[-1]


def _fs(path: str) -> tuple[Any, str]:
  """The fsspec filesystem of a URL and the path within it; a scheme without its package installed
  names the package."""
  import fsspec

  prepare(path)
  try:
    return fsspec.core.url_to_fs(path)
  except (ImportError, ValueError) as e:
    raise ValueError(
      f"{path}: no filesystem for this URL ({e}). gs:// needs `pip install gcsfs`, s3:// needs "
      f"`pip install s3fs`"
    ) from e


_PREPARED: set[str] = set()


def prepare(url: str) -> None:
  """Settings for a URL's scheme, made once before its first use:
  - no cached directory listings: what another host, or Orbax, wrote (or moved away) a moment ago
    must be seen (fsspec caches listings per filesystem object, and Orbax's is not this module's);
  - etils.epath (Orbax's path library) reaches gs:// through TensorFlow's GCS client when
    TensorFlow is installed; it is made to use fsspec like the rest of the run. epath caches that
    choice, so its cache is cleared. A user's explicit EPATH_USE_TF setting is kept."""
  scheme = url.split("://", 1)[0]
  if scheme in _PREPARED:
    return
  import fsspec

  fsspec.config.conf.setdefault(scheme, {}).setdefault("use_listings_cache", False)
  os.environ.setdefault("EPATH_USE_TF", "false")
  from etils.epath import gpath

  choice = getattr(gpath, "_is_tf_installed", None)
  if choice is not None and hasattr(choice, "cache_clear"):
    choice.cache_clear()
  _PREPARED.add(scheme)


def exists(path: str) -> bool:
  if not is_remote(path):
    return os.path.exists(path)
  fs, p = _fs(path)
  return bool(fs.exists(p))


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = _fs(path)
  return bool(fs.isdir(p))


def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  fs, p = _fs(path)
  return bool(fs.isfile(p))


def listdir(path: str) -> list[str]:
  """Names in a directory ([] when there is none)."""
  if not is_remote(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = _fs(path)
  fs.invalidate_cache(p)
  if not fs.isdir(p):
    return []
  return sorted(name(e) for e in fs.ls(p, detail=False) if e.rstrip("/") != p.rstrip("/"))


def read_bytes(path: str) -> bytes:
  if not is_remote(path):
    return pathlib.Path(path).read_bytes()
  fs, p = _fs(path)
  return bytes(fs.cat_file(p))


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def makedirs(path: str) -> None:
  if is_remote(path):
    return  # object stores have no directories: a prefix exists once an object is under it
  os.makedirs(path, exist_ok=True)


def write_bytes(path: str, data: bytes) -> None:
  """Readers see the old file or the new one, never part of one."""
  if not is_remote(path):
    files.atomic_write_bytes(path, data)
    return
  fs, p = _fs(path)
  fs.pipe_file(p, data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  """One file."""
  if not is_remote(path):
    os.unlink(path)
    return
  fs, p = _fs(path)
  fs.rm_file(p)


def remove_tree(path: str) -> None:
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, p = _fs(path)
  if fs.exists(p):
    fs.rm(p, recursive=True)


def _sizes(fs, root: str) -> dict[str, int]:
  fs.invalidate_cache(root)
  if not fs.isdir(root):
    return {"": int(fs.info(root)["size"])}
  found = fs.find(root, detail=True)
  return {k[len(root) :].lstrip("/"): int(v["size"]) for k, v in found.items()}


def move(src: str, dst: str) -> None:
  """Moves a file or directory. On object storage: copy, check that each file arrived whole, then
  remove the source."""
  if not is_remote(src):
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    os.rename(src, dst)
    return
  fs, s = _fs(src)
  _, d = _fs(dst)
  if fs.exists(d):
    raise FileExistsError(f"cannot move {src} to {dst}: the target exists")
  want = _sizes(fs, s)
  if fs.isdir(s):
    fs.copy(s.rstrip("/") + "/", d.rstrip("/") + "/", recursive=True)
  else:
    fs.copy(s, d)
  got = _sizes(fs, d)
  if got != want:
    missing = sorted(k for k in want if got.get(k) != want[k])
    raise OSError(f"moving {src} to {dst}: the copy is incomplete ({missing[:5]}); {src} is kept")
  fs.rm(s, recursive=True)


def upload_dir(local: str, remote: str) -> None:
  """Copies the files under a local directory to a directory URL."""
  fs, r = _fs(remote)
  for root, _, names in os.walk(local):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), local)
      fs.put_file(os.path.join(root, n), r.rstrip("/") + "/" + rel.replace(os.sep, "/"))


def download_dir(remote: str, local: str) -> None:
  fs, r = _fs(remote)
  fs.invalidate_cache(r)
  for key in fs.find(r):
    rel = key[len(r.rstrip("/")) + 1 :]
    target = os.path.join(local, *rel.split("/"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fs.get_file(key, target)


@contextlib.contextmanager
def local_dir(url: str, *, download: bool) -> Iterator[str]:
  """A local directory for a library that can only read or write one (tf.data's iterator
  checkpoints): `url` itself when it is local; otherwise a temporary directory, filled from `url`
  first (`download`) or uploaded to it once the block succeeds."""
  if not is_remote(url):
    yield url
    return
  with tempfile.TemporaryDirectory(prefix="polylm-") as local:
    if download:
      download_dir(url, local)
    yield local
    if not download:
      upload_dir(local, url)


class AppendLog:
  """A text file that grows by lines (metrics.jsonl). Local: appended and flushed at every write.
  Object storage: held here and uploaded whole when `upload_every_s` has passed since the last
  upload, and at close."""

  def __init__(self, path: str, *, upload_every_s: float = UPLOAD_EVERY_S):
    self.path = path
    self.remote = is_remote(path)
    self.upload_every_s = upload_every_s
    if self.remote:
      self._text = read_text(path) if exists(path) else ""
      self._uploaded = time.monotonic()
      self._dirty = False
    else:
      self._file = open(path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    if not self.remote:
      self._file.write(text)
      self._file.flush()
      return
    self._text += text
    self._dirty = True
    if time.monotonic() - self._uploaded >= self.upload_every_s:
      self.flush()

  def flush(self) -> None:
    if self.remote and self._dirty:
      write_text(self.path, self._text)
      self._uploaded, self._dirty = time.monotonic(), False

  def close(self) -> None:
    if self.remote:
      try:
        self.flush()
      except OSError as e:  # the run's result stands; say what was not written
        logging.error("could not upload %s: %s", self.path, e)
    else:
      self._file.close()


class RemoteWorkdirLock(files.WorkdirLock):
  """`<workdir>/LOCK` on object storage. There is no flock there: the object says who holds it
  and when it last refreshed it (`heartbeat`, every `heartbeat_s`), and a lock not refreshed for
  `stale_after_s` is taken over with a warning. It is created only if absent (a generation
  precondition on GCS: of two trainers starting at once, one gets it), then read back to check that
  it holds this trainer's token."""

  def __init__(
    self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0
  ) -> None:
    super().__init__("/", heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)
    self.url = join(workdir, self.NAME)
    self.path = self.url  # type: ignore[assignment]  # (the base class's messages name it)

  def _record(self) -> bytes:
    return (json.dumps(dict(self._info(), heartbeat=time.time())) + "\n").encode()

  def _take(self) -> None:
    fs, p = _fs(self.url)
    holder = self._read()
    if holder is not None or exists(self.url):
      reason = self._stale_reason(holder)
      if reason is None:
        raise files.WorkdirLockedError(self._in_use_message(holder))
      logging.warning("workdir lock %s is stale (%s): taking it over", self.url, reason)
      fs.pipe_file(p, self._record())
    else:
      try:
        fs.pipe_file(p, self._record(), mode="create")
      except FileExistsError:
        raise files.WorkdirLockedError(self._in_use_message(self._read())) from None
    now = self._read()
    if now is None or now.get("token") != self._token:
      raise files.WorkdirLockedError(self._in_use_message(now))

  def _give_back(self) -> None:
    holder = self._read()
    if holder is not None and holder.get("token") == self._token:  # only ever our own lock
      remove(self.url)

  def _heartbeat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self._read()
        if holder is not None and holder.get("token") != self._token:
          logging.error("workdir lock %s was taken over by %s", self.url, holder.get("host"))
          return
        write_bytes(self.url, self._record())
      except OSError as e:
        logging.warning("could not refresh the workdir lock %s: %s", self.url, e)

  def _read(self) -> dict | None:
    try:
      return dict(json.loads(read_text(self.url)))
    except (OSError, ValueError, TypeError):
      return None

  def _stale_reason(self, holder: dict | None) -> str | None:
    if holder is None:
      return "it is unreadable"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_after_s:
      return f"its holder on {holder.get('host')} has not refreshed it for {age:.0f} s"
    return None


def workdir_lock(workdir: str | os.PathLike) -> files.WorkdirLock:
  """The trainer's lock on its workdir, local or on object storage."""
  if is_remote(workdir):
    return RemoteWorkdirLock(os.fspath(workdir))
  return files.WorkdirLock(workdir)


def check_replaceable(url: str | os.PathLike, *, overwrite: bool, looks_like, kind: str) -> bool:
  """Whether the output directory `url` (local or a URL) holds something to replace (False: it is
  missing or empty). What is there may be replaced only with `overwrite` and only if
  `looks_like(url)` says it is an earlier output of `kind`; otherwise FileExistsError."""
  names = listdir(os.fspath(url))
  if not names:
    return False
  if not overwrite:
    raise FileExistsError(
      f"output directory {url} exists and is not empty; pass overwrite (--overwrite) to replace it"
    )
  if not looks_like(url):
    raise FileExistsError(
      f"--out={url} is not a {kind} (it holds {names[:6]}{' ...' if len(names) > 6 else ''}); "
      f"refusing to replace it, even with --overwrite"
    )
  return True


@contextlib.contextmanager
def built_locally(url: str, *, overwrite: bool, looks_like, kind: str, last: str) -> Iterator[str]:
  """An output directory for a bucket `url`, built in a local temporary directory (the path
  yielded) and uploaded when the block completes (publish_dir). What is at `url` is checked before
  the work (check_replaceable), so a refused output costs nothing."""
  replace = dict(overwrite=overwrite, looks_like=looks_like, kind=kind)
  check_replaceable(url, **replace)
  with tempfile.TemporaryDirectory(prefix="polylm-out-") as local:
    out = os.path.join(local, "out")
    yield out
    publish_dir(out, url, last=last, **replace)


def publish_dir(local: str, url: str, *, overwrite: bool, looks_like, kind: str, last: str) -> None:
  """Uploads a finished local output directory (an export, an import) to a directory URL. An
  earlier output there (`check_replaceable`) is moved to `<url>.replaced-<time>` first (kept: on
  object storage a move is a copy, so the user deletes it). The file `last` (what makes the
  directory a loadable model: config.json, meta.json) goes up last, so an interrupted upload is
  not one."""
  if check_replaceable(url, overwrite=overwrite, looks_like=looks_like, kind=kind):
    kept = f"{url.rstrip('/')}.replaced-{files.timestamp()}"
    move(url, kept)
    logging.warning("the earlier %s at %s was moved to %s", kind, url, kept)
  fs, r = _fs(url)
  local_names = sorted(os.listdir(local))
  final = [n for n in local_names if n == last]
  for n in [n for n in local_names if n not in final] + final:
    if os.path.isdir(os.path.join(local, n)):
      upload_dir(os.path.join(local, n), join(url, n))
    else:
      fs.put_file(os.path.join(local, n), r.rstrip("/") + "/" + n)
