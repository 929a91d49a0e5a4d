"""Tensors that are views of mapped bytes (no vLLM import: benchmarks use it too)."""

from __future__ import annotations

import mmap
from pathlib import Path

import torch

from hydraserve.store.manifest import TensorInfo

TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}


def tensor_view(buffer: mmap.mmap, info: TensorInfo) -> torch.Tensor:
    """A tensor sharing ``buffer``'s memory at the tensor's manifest offset (no copy)."""
    dtype = TORCH_DTYPES[info.dtype]
    count = info.size // dtype.itemsize
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=info.offset).view(info.shape)


def process_memory() -> dict[str, int]:
    """This process's resident memory by kind, in bytes (Linux ``/proc/self/status``)."""
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out
