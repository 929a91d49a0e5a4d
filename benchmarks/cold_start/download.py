"""Baseline fetch: download a model's whole checkpoint from the store to a local directory.

What a serverless vLLM does before it can start: every byte over the node's one NIC
(parallel reads of the stored parts, like `aws s3 cp`), then the config and tokenizer. The
file is the checkpoint as its owner pushed it (its own tensor names; fused stacks split
back), which stock vLLM loads for any architecture.
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
    store.download_checkpoint(dest / WEIGHTS_NAME)


if __name__ == "__main__":
    main()
