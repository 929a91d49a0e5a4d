"""Where model bytes live in shared memory on a node, and the state file of each fetch.

One sparse file per (model, revision) holds the store's weights file at the same offsets,
so a tensor's manifest offset is its offset in shared memory, whichever stages a node has
fetched. Each fetch (a set of byte ranges: one stage, or the whole model) has a small JSON
state file next to it, replaced atomically, with a monotone *verified watermark*: how many
bytes of the fetch's ranges, in order, are written and have passed their sha256 check.
A worker polls that file and never reads a byte past the watermark.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from enum import StrEnum
from pathlib import Path, PurePath
from typing import Any, TypeVar

from pydantic import BaseModel, Field


class FetchState(StrEnum):
    PENDING = "pending"
    FETCHING = "fetching"
    DONE = "done"
    FAILED = "failed"


class FetchStatus(BaseModel):
    state: FetchState = FetchState.PENDING
    total: int = 0
    verified: int = Field(default=0, description="Verified watermark, bytes in range order.")
    fetched: int = Field(default=0, description="Bytes written so far (any order).")
    bytes_from_store: int = Field(default=0, description="Bytes moved, retries included.")
    retries: int = 0
    error: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    ranges: list[tuple[int, int]] = Field(default_factory=list)
    deadline: float | None = Field(
        default=None,
        description="Epoch seconds by which the plan that asked for this fetch needs it "
        "done (the earliest such plan); None: no deadline.",
    )
    low_priority: bool = Field(
        default=False, description="A background fetch (consolidation) that yields."
    )


def model_key(uri: str, revision: str) -> str:
    """A filesystem-safe, collision-free directory name for a model revision."""
    tail = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in tail)[:48]
    digest = hashlib.sha1(f"{uri}@{revision}".encode()).hexdigest()[:10]
    return f"{safe}-{digest}-{revision}"


_P = TypeVar("_P", bound=PurePath)

# A name that can be one path component: no separators, no '.'/'..', bounded.
SAFE_NAME_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"


def is_safe_name(name: str) -> bool:
    return re.fullmatch(SAFE_NAME_PATTERN, name) is not None


def kv_area_dir(shm_dir: _P, area: str) -> _P:
    """Where one instance's moved KV caches live on a node: written by the pipeline's
    head and read by the standalone that replaces it, and by no one else (the area is
    mounted only into that instance's pods)."""
    if not is_safe_name(area):
        raise ValueError(f"unusable KV area name {area!r}")
    return shm_dir / "kv" / area


def fetch_name(pp: int | None, rank: int | None) -> str:
    """State-file stem of a fetch: one stage (``pp2-rank1``) or the whole model (``full``)."""
    return "full" if pp is None or rank is None else f"pp{pp}-rank{rank}"


class ModelShm:
    """The shared-memory directory of one model revision on this node."""

    def __init__(self, shm_dir: Path, uri: str, revision: str) -> None:
        self.dir = Path(shm_dir) / model_key(uri, revision)
        self.uri = uri
        self.revision = revision

    @property
    def weights_path(self) -> Path:
        return self.dir / "model.safetensors"

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    def state_path(self, name: str) -> Path:
        return self.dir / f"{name}.state.json"

    def read_status(self, name: str) -> FetchStatus | None:
        try:
            return FetchStatus.model_validate_json(self.state_path(name).read_bytes())
        except FileNotFoundError:
            return None

    def write_status(self, name: str, status: FetchStatus) -> None:
        write_json_atomic(self.state_path(name), status.model_dump(mode="json"))

    def create_weights_file(self, size: int) -> None:
        """Create the sparse weights file at full size (holes cost no memory on tmpfs)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.weights_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    def memory_bytes(self) -> int:
        """Bytes this model actually occupies in shared memory (allocated blocks)."""
        try:
            return self.weights_path.stat().st_blocks * 512
        except FileNotFoundError:
            return 0


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def now() -> float:
    return time.time()
