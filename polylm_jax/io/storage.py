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
  local `disk.atomic_write_bytes` gets from a temporary name and a rename;
- libraries that need a local directory (tf.data iterator checkpoints, TensorBoard event files)
  write into a local temporary directory that is uploaded (`upload_dir`) or downloaded first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Iterator

from polylm_jax.io import disk

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


def filesystem(path: str) -> tuple[Any, str]:
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
  fs, p = filesystem(path)
  return bool(fs.exists(p))


def isdir(path: str) -> bool:
  if not is_remote(path):
    return os.path.isdir(path)
  fs, p = filesystem(path)
  return bool(fs.isdir(p))


def isfile(path: str) -> bool:
  if not is_remote(path):
    return os.path.isfile(path)
  fs, p = filesystem(path)
  return bool(fs.isfile(p))


def listdir(path: str) -> list[str]:
  """Names in a directory ([] when there is none)."""
  if not is_remote(path):
    return sorted(os.listdir(path)) if os.path.isdir(path) else []
  fs, p = filesystem(path)
  fs.invalidate_cache(p)
  if not fs.isdir(p):
    return []
  return sorted(name(e) for e in fs.ls(p, detail=False) if e.rstrip("/") != p.rstrip("/"))


def read_bytes(path: str) -> bytes:
  if not is_remote(path):
    return pathlib.Path(path).read_bytes()
  fs, p = filesystem(path)
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
    disk.atomic_write_bytes(path, data)
    return
  fs, p = filesystem(path)
  fs.pipe_file(p, data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


def remove(path: str) -> None:
  """One file."""
  if not is_remote(path):
    os.unlink(path)
    return
  fs, p = filesystem(path)
  fs.rm_file(p)


def remove_tree(path: str) -> None:
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, p = filesystem(path)
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
  fs, s = filesystem(src)
  _, d = filesystem(dst)
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
  fs, r = filesystem(remote)
  for root, _, names in os.walk(local):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), local)
      fs.put_file(os.path.join(root, n), r.rstrip("/") + "/" + rel.replace(os.sep, "/"))


def download_dir(remote: str, local: str) -> None:
  fs, r = filesystem(remote)
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
