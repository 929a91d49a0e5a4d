"""The consumer side of a fetch: wait for the verified watermark, then map tensors in place.

No torch here, so the waiting logic is testable without an engine. The loader turns the
returned buffers into tensors.
"""

from __future__ import annotations

import mmap
import os
import time
from dataclasses import dataclass

from hydraserve.prefetcher.fetcher import stage_position
from hydraserve.prefetcher.shm import FetchState, FetchStatus, ModelShm, fetch_name
from hydraserve.store.manifest import Manifest, TensorInfo


class StageUnavailable(RuntimeError):
    """The bytes a worker needs will not arrive: the message says why and what to do."""


@dataclass
class WaitStats:
    waited_seconds: float = 0.0
    polls: int = 0


class StageSource:
    """Tensors of one stage (or the whole model), read from the node's shared memory."""

    def __init__(
        self,
        shm: ModelShm,
        manifest: Manifest,
        pp: int | None,
        rank: int | None,
        timeout_seconds: float = 600.0,
        poll_seconds: float = 0.002,
    ) -> None:
        self.shm = shm
        self.manifest = manifest
        self.timeout_seconds = timeout_seconds
        self.poll_seconds = poll_seconds
        self.stats = WaitStats()
        # The whole model is pp 1's one stage: what the engine reads (tensors it never
        # reads, such as a tied head's copy, stay in the file unread).
        stage = manifest.stage(pp, rank) if pp is not None and rank is not None else None
        self.tensors: list[TensorInfo] = [
            manifest.tensor(n) for n in (stage or manifest.stage(1, 0)).tensors
        ]
        # A whole-model fetch (cache, consolidation) also satisfies any stage.
        self.candidates = [fetch_name(pp, rank)] + ([] if pp is None else [fetch_name(None, None)])
        self._map: mmap.mmap | None = None
        self._status: FetchStatus | None = None
        self._fetch: str | None = None

    def _failed(self, name: str, status: FetchStatus) -> StageUnavailable:
        return StageUnavailable(
            f"the fetch of {self.manifest.name} ({name}) failed: {status.error}"
        )

    def _covering_status(self, tensor: TensorInfo) -> tuple[str, FetchStatus] | None:
        best = None
        for name in self.candidates:
            status = self.shm.read_status(name)
            if status is None:
                continue
            if any(s <= tensor.offset and tensor.end <= e for s, e in status.ranges):
                if status.state == FetchState.DONE:
                    return name, status
                best = best or (name, status)
        return best

    def wait_for(self, tensor: TensorInfo) -> None:
        """Block until ``tensor``'s bytes are written and verified."""
        deadline = time.monotonic() + self.timeout_seconds
        started = time.monotonic()
        while True:
            found = self._covering_status(tensor)
            self.stats.polls += 1
            if found is not None:
                name, status = found
                if status.state == FetchState.FAILED:
                    raise self._failed(name, status)
                if status.verified >= stage_position(status.ranges, tensor.end):
                    self.stats.waited_seconds += time.monotonic() - started
                    return
            if time.monotonic() > deadline:
                why = "no fetch was started" if found is None else f"fetch {found[1].state}"
                raise StageUnavailable(
                    f"tensor {tensor.name} of {self.manifest.name} did not arrive within "
                    f"{self.timeout_seconds:.0f}s ({why}); is the node prefetcher running? "
                    f"(looked in {self.shm.dir})"
                )
            time.sleep(self.poll_seconds)

    def wait_started(self) -> None:
        """Block until a fetch covering this stage exists and so does its weights file (full
        size once created); a fetch that already failed raises with its reason."""
        deadline = time.monotonic() + self.timeout_seconds
        while True:
            found = self._covering_status(self.tensors[0])
            if found is not None:
                name, status = found
                if status.state == FetchState.FAILED:
                    raise self._failed(name, status)
                # The status may be published before the file is created.
                if os.path.exists(self.shm.weights_path):
                    return
            if time.monotonic() > deadline:
                raise StageUnavailable(
                    f"no fetch of {self.manifest.name} started within "
                    f"{self.timeout_seconds:.0f}s (looked in {self.shm.dir})"
                )
            time.sleep(self.poll_seconds)

    def buffer(self) -> mmap.mmap:
        """The weights file, mapped copy-on-write from a read-only descriptor.

        Reads share the node's pages; a write by the engine stays private and never
        reaches the node's copy (the worker may not even open it for writing: on
        Kubernetes the model's directory is mounted read-only). Pages read before their
        bytes land still see them once the prefetcher writes them (Linux keeps an
        unwritten private page backed by the file), so early adoption can map at once;
        only verified bytes may be used through it.
        """
        if self._map is None:
            fd = os.open(self.shm.weights_path, os.O_RDONLY)
            try:
                self._map = mmap.mmap(
                    fd,
                    self.manifest.weights_size,
                    mmap.MAP_PRIVATE,
                    mmap.PROT_READ | mmap.PROT_WRITE,
                )
            finally:
                os.close(fd)
        return self._map
