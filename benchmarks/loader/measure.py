"""One loading path, measured in a fresh process (so peak RSS is its own).

``python -m benchmarks.loader.measure {streaming|safetensors|copy} MANIFEST WEIGHTS``
prints one JSON object: seconds to make every tensor usable, seconds to first touch every
byte, and how much this process's peak resident memory grew.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import time
from pathlib import Path

import torch

from hydraserve.store.manifest import Manifest
from hydraserve.worker.views import process_memory, tensor_view


def touch(tensors: list[torch.Tensor]) -> None:
    # Reading every byte faults every page in, as the first forward pass would. Summed as
    # int64 words: this torch build's uint8 reductions are ~1000x slower than int64 ones.
    for t in tensors:
        raw = t.reshape(-1).view(torch.uint8)
        words = raw.numel() // 8 * 8
        raw[:words].view(torch.int64).sum()
        raw[words:].sum()


def main() -> None:
    mode, manifest_path, weights_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    manifest = Manifest.model_validate_json(manifest_path.read_bytes())
    torch.set_num_threads(1)
    before = process_memory()
    start = time.perf_counter()
    if mode == "streaming":
        fd = os.open(weights_path, os.O_RDONLY)
        buffer = mmap.mmap(
            fd, manifest.weights_size, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE
        )
        os.close(fd)
        tensors = [tensor_view(buffer, info) for info in manifest.tensors]
    elif mode == "safetensors":
        from safetensors.torch import load_file

        tensors = list(load_file(str(weights_path)).values())
    else:  # "copy": what a loader that allocates parameters and copies into them does
        from safetensors.torch import load_file

        tensors = [torch.empty_like(t).copy_(t) for t in load_file(str(weights_path)).values()]
    adopted = time.perf_counter()
    touch(tensors)
    touched = time.perf_counter()
    after = process_memory()
    print(
        json.dumps(
            {
                "mode": mode,
                "bytes": manifest.total_bytes,
                "adopt_seconds": adopted - start,
                "touch_seconds": touched - adopted,
                "peak_rss_growth_bytes": after["VmHWM"] - before["VmHWM"],
                "anon_growth_bytes": after["RssAnon"] - before["RssAnon"],
                "shmem_growth_bytes": after["RssShmem"] - before["RssShmem"],
            }
        )
    )


if __name__ == "__main__":
    main()
