"""Baseline fetch: download a model's whole checkpoint from the store to a local directory.

What a serverless vLLM does before it can start: every byte over the node's one NIC.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hydraserve.settings import CommonSettings
from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.manifest import WEIGHTS_NAME


def main() -> None:
    uri, dest = sys.argv[1], Path(sys.argv[2])
    store = ModelStore(ModelRef(uri), CommonSettings().s3)
    store.download_side_files(dest)
    backend = store.backend
    # boto3's managed transfer: parallel ranged GETs, like `aws s3 cp`.
    from hydraserve.store.backends import S3Backend

    target = dest / WEIGHTS_NAME
    if isinstance(backend, S3Backend):
        from boto3.s3.transfer import TransferConfig

        # The same 64 MB ranges as the prefetchers read (see run.py).
        config = TransferConfig(multipart_chunksize=64 << 20, max_concurrency=8)
        backend.client.download_file(
            backend.bucket, backend._key(WEIGHTS_NAME), str(target), Config=config
        )
    else:
        target.write_bytes(backend.read(WEIGHTS_NAME))


if __name__ == "__main__":
    main()
