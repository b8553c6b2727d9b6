"""The GCS emulator the object-storage tests run (`python tests/gcs_emulator.py start ...`, the
arguments of gcp-storage-emulator): gcp-storage-emulator, plus two things real GCS does that it
does not:
- the x-goog-generation and x-goog-metageneration headers with an object's data. Tensorstore's GCS
  driver (Orbax writes checkpoints through it) takes an object's generation from that header and
  makes its next write to the object conditional on it; without the header, an OCDBT checkpoint
  whose manifest is written twice in one save fails ("Malformed StorageGeneration");
- the `ifGenerationMatch` precondition of an upload (412 when the object's generation, 0 for none,
  differs): the workdir lock is created only if absent, and of two trainers racing for it one
  must get 412 (gcsfs: FileExistsError)."""

from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download = objects.download
_insert = objects.insert


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


def _generation(storage, bucket: str, name: str) -> int:
  try:
    return int(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return 0


def insert(request, response, storage, *args, **kwargs):
  wanted = request.query.get("ifGenerationMatch")
  if wanted:
    kind = request.query.get("uploadType", [""])[0]
    name = (
      request.data["meta"].get("name")
      if kind == "multipart" and "name" not in request.query
      else request.query.get("name", [None])[0]
    )
    bucket = request.params["bucket_name"]
    if name is not None and _generation(storage, bucket, name) != int(wanted[0]):
      response.status = HTTPStatus.PRECONDITION_FAILED
      message = f"At least one of the pre-conditions you specified did not hold ({name})"
      response.json({"error": {"code": 412, "message": message}})
      return None
  return _insert(request, response, storage, *args, **kwargs)


objects.download = download  # objects.get calls it by this name for ?alt=media
replaced = {_download: download, _insert: insert}
for _, methods in server.HANDLERS:
  for method, handler in list(methods.items()):
    if handler in replaced:
      methods[method] = replaced[handler]

if __name__ == "__main__":
  main()
