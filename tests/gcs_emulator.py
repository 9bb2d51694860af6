"""``python tests/gcs_emulator.py PORT DATA_DIR BUCKET``: the GCS emulator the storage tests run
(gcp-storage-emulator, from the ``test`` extra), on 127.0.0.1, its objects kept in DATA_DIR (so that a
restart keeps them), with the bucket BUCKET.

One change to the emulator: its object downloads carry the ``x-goog-generation`` header, as Google Cloud
Storage's do. The emulator sends none, and tensorstore reads an object's generation from that header: with
it missing, every read of an OCDBT manifest (what orbax checkpoints are) fails with "Malformed
StorageGeneration". The emulator does not implement generation preconditions (``ifGenerationMatch``) either:
a conditional write always succeeds, which is harmless with one writer, as in these tests.
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def download(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - not found: the emulator's own 404 stands
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])


objects.download = download  # before the server module builds its routing table from it

from gcp_storage_emulator.server import create_server  # noqa: E402

if __name__ == "__main__":
    port, data_dir, bucket = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    create_server("127.0.0.1", port, in_memory=False, default_bucket=bucket, data_dir=data_dir).run()
