"""One loading path, measured in a fresh process (so peak RSS is its own).

``python -m benchmarks.loader.measure {streaming|safetensors|copy|mtcopy} MANIFEST WEIGHTS
[THREADS]`` prints one JSON object: seconds to make every tensor usable, seconds to first
touch every byte, and how much this process's peak resident memory grew.

* ``streaming``: HydraServe's adoption, every tensor a view of a private mapping of the file;
* ``safetensors``: ``safetensors.torch.load_file`` (what vLLM's default loader calls per file);
* ``copy``: allocate parameters, copy from ``load_file``'s tensors (one thread);
* ``mtcopy``: a multi-threaded copying loader (as Run:ai's streamer or fastsafetensors do
  on CPU): parameters allocated, then THREADS threads ``pread`` the file's ranges straight
  into them in 16 MiB pieces (no intermediate buffer).
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
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


PIECE_BYTES = 16 << 20


def threaded_copy(manifest: Manifest, weights_path: Path, threads: int) -> list[torch.Tensor]:
    """Allocate every parameter, then read the file into them with ``threads`` threads."""
    from hydraserve.worker.views import TORCH_DTYPES

    tensors = [torch.empty(tuple(t.shape), dtype=TORCH_DTYPES[t.dtype]) for t in manifest.tensors]
    pieces: list[tuple[memoryview, int]] = []
    for info, tensor in zip(manifest.tensors, tensors, strict=True):
        flat = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        for start in range(0, info.size, PIECE_BYTES):
            pieces.append((flat[start : start + PIECE_BYTES], info.offset + start))
    fd = os.open(weights_path, os.O_RDONLY)
    try:

        def read(piece: tuple[memoryview, int]) -> None:
            target, offset = piece
            done = 0
            while done < len(target):
                n = os.preadv(fd, [target[done:]], offset + done)
                if n <= 0:
                    raise OSError(f"short read at {offset + done}")
                done += n

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, pieces))
    finally:
        os.close(fd)
    return tensors


def main() -> None:
    mode, manifest_path, weights_path = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    threads = int(sys.argv[4]) if len(sys.argv) > 4 else os.cpu_count() or 1
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
    elif mode == "mtcopy":
        tensors = threaded_copy(manifest, weights_path, threads)
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
                "threads": threads if mode == "mtcopy" else 1,
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
