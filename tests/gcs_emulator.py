"""The GCS emulator the object-storage tests run (`python tests/gcs_emulator.py start ...`, the
arguments of gcp-storage-emulator): gcp-storage-emulator, plus the x-goog-generation and
x-goog-metageneration headers real GCS sends with an object's data. Tensorstore's GCS driver (Orbax
writes checkpoints through it) takes an object's generation from that header and makes its next
write to the object conditional on it; without the header, an OCDBT checkpoint whose manifest is
written twice in one save fails ("Malformed StorageGeneration")."""

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
  _download(request, response, storage, *args, **kwargs)
  if response.status.value in (200, 206):
    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]


objects.download = download  # objects.get calls it by this name for ?alt=media
for _, methods in server.HANDLERS:
  for method, handler in list(methods.items()):
    if handler is _download:
      methods[method] = download

if __name__ == "__main__":
  main()
