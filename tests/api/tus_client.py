#!/usr/bin/env python3
"""Drives basalt's tus endpoint with tuspy, a real tus client, for tests/api/storage_tus.rs.

usage: tus_client.py ENDPOINT TOKEN FILE URL_STORE PATH CHUNK_SIZE [STOP_AT]

Uploads FILE as the object PATH in CHUNK_SIZE chunks. The upload's URL is kept in URL_STORE
(tuspy's own FileStorage, keyed by the file's fingerprint), so a second run finds it, asks
the server for the offset (HEAD) and resumes from there. With STOP_AT the run stops once
that many bytes are sent and exits, as an interrupted client would. Prints one JSON line:
{"start": offset at start, "offset": offset reached, "url": the upload's URL}.
"""

import json
import sys

from tusclient import client
from tusclient.storage import filestorage


def main() -> None:
    endpoint, token, file_path, url_store, path, chunk_size = sys.argv[1:7]
    stop_at = int(sys.argv[7]) if len(sys.argv) > 7 else None
    tus = client.TusClient(endpoint, headers={"Authorization": f"Bearer {token}"})
    storage = filestorage.FileStorage(url_store)
    uploader = tus.uploader(
        file_path=file_path,
        chunk_size=int(chunk_size),
        metadata={"path": path, "filetype": "application/x-test"},
        store_url=True,
        url_storage=storage,
    )
    start = uploader.offset
    uploader.upload(stop_at=stop_at)
    storage.close()
    print(json.dumps({"start": start, "offset": uploader.offset, "url": uploader.url}))


if __name__ == "__main__":
    main()
