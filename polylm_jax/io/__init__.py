"""Every file the project writes goes through here, so that nothing of a user's is lost.

- `disk`: a local file appears complete or not at all (temporary name + rename, usual permissions);
  damaged data is moved aside, never deleted.
- `storage`: the same operations on a local path or an object-storage URL (gs://, s3://, ...
  through fsspec), so a run's workdir may live in a bucket.
- `outputs`: output directories (an export, an import) built apart and swapped in or uploaded only
  when complete, replacing only an earlier output of the same kind.
- `locks`: one trainer per workdir, and the check that every host sees the same workdir.

Imports run disk <- storage <- outputs, locks.
"""
