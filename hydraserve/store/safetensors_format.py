"""Reading and writing the safetensors container without torch.

Format: 8-byte little-endian header length N, N bytes of JSON header (padded with spaces
to 8-byte alignment), then the data buffer. Each header entry gives dtype, shape and
``data_offsets`` relative to the start of the data buffer.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


class SafetensorsFormatError(ValueError):
    pass


@dataclass(frozen=True)
class TensorSlot:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def numel(shape: Iterable[int]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def read_header(
    f: BinaryIO, path: str = "<stream>"
) -> tuple[int, list[TensorSlot], dict[str, str]]:
    """Return (data_start, tensors sorted by offset, metadata)."""
    raw = f.read(8)
    if len(raw) != 8:
        raise SafetensorsFormatError(f"{path}: too short to be a safetensors file")
    (header_len,) = struct.unpack("<Q", raw)
    if header_len > 100 << 20:
        raise SafetensorsFormatError(f"{path}: header length {header_len} is implausible")
    header = json.loads(f.read(header_len))
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", {}) or {}
    slots = []
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = entry["dtype"]
        shape = tuple(int(d) for d in entry["shape"])
        if dtype not in DTYPE_BYTES:
            raise SafetensorsFormatError(f"{path}: tensor {name} has unknown dtype {dtype}")
        if end - begin != numel(shape) * DTYPE_BYTES[dtype]:
            raise SafetensorsFormatError(f"{path}: tensor {name} size does not match its shape")
        slots.append(TensorSlot(name, dtype, shape, data_start + begin, data_start + end))
    slots.sort(key=lambda s: s.start)
    return data_start, slots, metadata


def read_file_header(path: Path) -> tuple[int, list[TensorSlot], dict[str, str]]:
    with open(path, "rb") as f:
        return read_header(f, str(path))


def encode_header(
    entries: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None = None
) -> bytes:
    """Header bytes (length prefix included) for tensors written back to back in order.

    ``entries`` are (name, dtype, shape, nbytes). The JSON keeps insertion order, and the
    data offsets follow the list order, so the caller controls the byte layout.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in entries:
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    body = json.dumps(header, separators=(",", ":")).encode()
    pad = (8 - (8 + len(body)) % 8) % 8
    body += b" " * pad
    return struct.pack("<Q", len(body)) + body
