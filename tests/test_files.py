"""polylm_jax.io: how the project writes a user's files."""

import os

from polylm_jax.io import disk


def test_atomically_written_files_get_the_permissions_open_would_give(tmp_path):
  # A config, tokenizer or model written under a temporary name keeps mkstemp's 0600 unless it
  # is fixed: colleagues and the serving user could not read it.
  old = os.umask(0o027)
  try:
    disk.atomic_write_text(tmp_path / "config.gin", "x = 1\n")
    disk.atomic_write_bytes(tmp_path / "tokenizer.model", b"\0")
  finally:
    os.umask(old)
  for name in ("config.gin", "tokenizer.model"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name
