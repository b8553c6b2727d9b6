"""Output directories (an export, an import, a tokenizer) replaced safely: built under a hidden
temporary name (locally) or in a local temporary directory (for a bucket), swapped in or uploaded
only when complete, replacing only what looks like an earlier output of the same kind, never the
source it was made from."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Callable, Iterator, Sequence

from polylm_jax.io import disk, storage
from polylm_jax.io.disk import check_apart


@contextlib.contextmanager
def staged_directory(
  out: str | os.PathLike,
  *,
  overwrite: bool,
  kind: str,
  looks_like: Callable[[pathlib.Path], bool],
  sources: Sequence[str | os.PathLike] = (),
) -> Iterator[pathlib.Path]:
  """Yields a hidden temporary sibling of `out` to write into; on success it becomes `out`.

  A failure (any exception) removes the temporary directory and leaves `out` as it was. An existing
  non-empty `out` is replaced only with `overwrite` and only if `looks_like(out)` says it is an
  earlier output of this `kind`; `out` may never be, contain or lie inside one of `sources`.
  """
  out = pathlib.Path(out).absolute()
  for source in sources:
    check_apart(out, source)
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"--out={out} exists and is not a directory")
  check_replaceable(out, overwrite=overwrite, looks_like=looks_like, kind=kind)
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
  # mkdtemp makes it 0700: the finished output must be readable by others (a server running as
  # another user), as a plain mkdir would make it.
  os.chmod(staging, 0o777 & ~disk.umask())
  try:
    yield staging
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)  # made above by us; holds only this attempt
    raise
  replaced = None
  if out.exists():
    replaced = out.parent / f".{out.name}.replaced-{uuid.uuid4().hex[:8]}"
    os.rename(out, replaced)
  os.rename(staging, out)
  if replaced is not None:
    shutil.rmtree(replaced)  # the earlier output of the same kind, checked above


def check_replaceable(url: str | os.PathLike, *, overwrite: bool, looks_like, kind: str) -> bool:
  """Whether the output directory `url` (local or a URL) holds something to replace (False: it is
  missing or empty). What is there may be replaced only with `overwrite` and only if
  `looks_like(url)` says it is an earlier output of `kind`; otherwise FileExistsError."""
  names = storage.listdir(os.fspath(url))
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
    kept = f"{url.rstrip('/')}.replaced-{disk.timestamp()}"
    storage.move(url, kept)
    logging.warning("the earlier %s at %s was moved to %s", kind, url, kept)
  fs, r = storage.filesystem(url)
  local_names = sorted(os.listdir(local))
  final = [n for n in local_names if n == last]
  for n in [n for n in local_names if n not in final] + final:
    if os.path.isdir(os.path.join(local, n)):
      storage.upload_dir(os.path.join(local, n), storage.join(url, n))
    else:
      fs.put_file(os.path.join(local, n), r.rstrip("/") + "/" + n)
