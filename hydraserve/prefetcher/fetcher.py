"""Fetch byte ranges of a model's weights file from the store into shared memory.

Parallel ranged GETs (``concurrency`` × ``chunk_bytes``), issued in range order so the
verified watermark moves early; each tensor's sha256 is checked as soon as its last byte
lands, and a bad tensor is fetched again (bounded). Store errors are retried with
exponential backoff; after the last retry the fetch fails with a message naming the range.
The same code runs inside the node prefetcher and, when no prefetcher started the fetch,
inside the worker itself.
"""

from __future__ import annotations

import bisect
import hashlib
import mmap
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from hydraserve.logs import get_logger
from hydraserve.prefetcher.shm import FetchState, FetchStatus, ModelShm, now
from hydraserve.store.backends import StoreError
from hydraserve.store.manifest import Manifest, TensorInfo, merge_ranges
from hydraserve.store.model_store import ChecksumError, ModelStore

log = get_logger("prefetcher.fetch")


@dataclass(frozen=True)
class FetchOptions:
    concurrency: int = 8
    # 8-16 MB ranged GETs are the usual sweet spot for S3: fewer requests, still parallel.
    chunk_bytes: int = 16 << 20
    max_retries: int = 5
    backoff_seconds: float = 0.2
    max_backoff_seconds: float = 5.0
    status_interval_seconds: float = 0.05


class FetchError(StoreError):
    pass


def tensors_in_ranges(manifest: Manifest, ranges: list[tuple[int, int]]) -> list[TensorInfo]:
    """Verifiable units (the header, tensors) wholly inside ``ranges``, in range order."""
    units = [manifest.header(), *manifest.tensors]
    out = []
    for start, end in ranges:
        out += [t for t in units if start <= t.offset and t.end <= end]
    return out


def subtract_ranges(
    ranges: list[tuple[int, int]], holes: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """``ranges`` without the bytes in ``holes`` (both sorted, non-overlapping), in order."""
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        cursor = start
        for h_start, h_end in holes:
            if h_end <= cursor or h_start >= end:
                continue
            if h_start > cursor:
                out.append((cursor, h_start))
            cursor = max(cursor, h_end)
        if cursor < end:
            out.append((cursor, end))
    return out


def stage_position(ranges: list[tuple[int, int]], file_offset: int) -> int:
    """Position of a file offset in the concatenation of ``ranges`` (for watermarks)."""
    pos = 0
    for start, end in ranges:
        if start <= file_offset <= end:
            return pos + (file_offset - start)
        pos += end - start
    raise ValueError(f"offset {file_offset} is outside the fetch ranges")


class RangeFetcher:
    """One fetch: a list of byte ranges of the weights file into the model's shm file."""

    def __init__(
        self,
        store: ModelStore,
        manifest: Manifest,
        shm: ModelShm,
        name: str,
        ranges: list[tuple[int, int]],
        options: FetchOptions | None = None,
        on_bytes: Callable[[int], None] | None = None,
        gate: Callable[[], None] | None = None,
        present: list[tuple[int, int]] | None = None,
    ) -> None:
        self.store = store
        self.manifest = manifest
        self.shm = shm
        self.name = name
        self.ranges = ranges
        self.options = options or FetchOptions()
        self.on_bytes = on_bytes
        self.gate = gate  # called before each request; may block (low-priority fetches)
        # Byte ranges already in the node's file, verified by another fetch (a stage the
        # node holds): checked in place instead of fetched again.
        self.present = merge_ranges(list(present or []))
        self.tensors = tensors_in_ranges(manifest, ranges)
        self.status = FetchStatus(total=sum(e - s for s, e in ranges), ranges=ranges)
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._last_publish = 0.0
        self.log = log.bind(model=manifest.name, fetch=name)

    def cancel(self) -> None:
        self._cancel.set()

    # -- bytes -------------------------------------------------------------------------

    def _get(self, start: int, end: int) -> bytes:
        """A ranged GET with bounded retries and exponential backoff."""
        delay = self.options.backoff_seconds
        for attempt in range(self.options.max_retries + 1):
            if self.gate is not None:
                self.gate()
            if self._cancel.is_set():
                raise FetchError(f"fetch {self.name} of {self.manifest.name} was cancelled")
            try:
                data = self.store.read_range(start, end)
                with self._lock:
                    self.status.bytes_from_store += len(data)
                if self.on_bytes:
                    self.on_bytes(len(data))
                return data
            except StoreError as exc:
                if attempt == self.options.max_retries:
                    raise FetchError(
                        f"fetching bytes [{start}, {end}) of {self.store.ref.uri} failed after "
                        f"{attempt + 1} attempts: {exc}. Check that the store is reachable."
                    ) from exc
                with self._lock:
                    self.status.retries += 1
                self.log.warning(
                    "fetch.retry", start=start, end=end, attempt=attempt + 1, error=str(exc)
                )
                time.sleep(delay)
                delay = min(delay * 2, self.options.max_backoff_seconds)
        raise AssertionError("unreachable")

    def _publish(self, force: bool = False) -> None:
        t = time.monotonic()
        if force or t - self._last_publish >= self.options.status_interval_seconds:
            self._last_publish = t
            with self._lock:
                snapshot = self.status.model_copy()
            self.shm.write_status(self.name, snapshot)

    # -- the fetch ---------------------------------------------------------------------

    def run(self) -> FetchStatus:
        """Fetch, verify and publish; returns the final status (raises on failure)."""
        self.status.state = FetchState.FETCHING
        self.status.started_at = now()
        self.shm.create_weights_file(self.manifest.weights_size)
        self._publish(force=True)
        fd = os.open(self.shm.weights_path, os.O_RDWR)
        view = mmap.mmap(fd, self.manifest.weights_size, mmap.MAP_SHARED)
        try:
            self._fetch_all(fd, view)
        except Exception as exc:
            self.status.state = FetchState.FAILED
            self.status.error = str(exc)
            self.status.finished_at = now()
            self._publish(force=True)
            self.log.error("fetch.failed", error=str(exc))
            raise
        finally:
            view.close()
            os.close(fd)
        self.status.state = FetchState.DONE
        self.status.finished_at = now()
        self._publish(force=True)
        seconds = self.status.finished_at - (self.status.started_at or 0)
        self.log.info(
            "fetch.done",
            bytes=self.status.total,
            seconds=round(seconds, 3),
            retries=self.status.retries,
        )
        return self.status

    def _fetch_all(self, fd: int, view: mmap.mmap) -> None:
        chunks: list[tuple[int, int]] = []
        missing = subtract_ranges(self.ranges, self.present)
        with self._lock:
            self.status.fetched += self.status.total - sum(e - s for s, e in missing)
        # Cut at the store's part boundaries first, so no request spans two objects.
        cuts = sorted({start for start, _ in self.manifest.weights_parts})
        for start, end in missing:
            inner = [c for c in cuts if start < c < end]
            for lo, hi in zip([start, *inner], [*inner, end], strict=True):
                for s in range(lo, hi, self.options.chunk_bytes):
                    chunks.append((s, min(s + self.options.chunk_bytes, hi)))
        chunk_starts = [c[0] for c in chunks]
        done = [False] * len(chunks)
        contiguous = 0  # chunks[:contiguous] are all written
        progressed = threading.Condition()

        def fetch_chunk(index: int) -> None:
            start, end = chunks[index]
            data = self._get(start, end)
            os.pwrite(fd, data, start)
            with progressed:
                done[index] = True
                self.status.fetched += end - start
                progressed.notify_all()

        def written_through(offset: int) -> bool:
            # True when every chunk up to the one holding ``offset - 1`` (or the last one
            # before it, when that byte was already present) is written.
            idx = bisect.bisect_right(chunk_starts, offset - 1) - 1
            return idx < contiguous

        with ThreadPoolExecutor(self.options.concurrency, thread_name_prefix="fetch") as pool:
            futures: list[Future[None]] = [pool.submit(fetch_chunk, i) for i in range(len(chunks))]
            try:
                for tensor in self.tensors:
                    with progressed:
                        while True:
                            while contiguous < len(chunks) and done[contiguous]:
                                contiguous += 1
                            if written_through(tensor.end):
                                break
                            failed = [f for f in futures if f.done() and f.exception()]
                            if failed:
                                raise failed[0].exception()  # type: ignore[misc]
                            progressed.wait(timeout=0.5)
                    self._verify(fd, view, tensor)
                    with self._lock:
                        self.status.verified = stage_position(self.ranges, tensor.end)
                    self._publish()
                # Surface any error from chunks outside every tensor (should be none).
                finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
                for f in finished:
                    if f.exception():
                        raise f.exception()  # type: ignore[misc]
            except BaseException:
                self._cancel.set()
                for f in futures:
                    f.cancel()
                raise
        with self._lock:
            self.status.verified = self.status.total

    def _verify(self, fd: int, view: mmap.mmap, tensor: TensorInfo) -> None:
        for attempt in range(self.options.max_retries + 1):
            digest = hashlib.sha256(memoryview(view)[tensor.offset : tensor.end]).hexdigest()
            if digest == tensor.sha256:
                return
            self.log.warning("fetch.checksum_mismatch", tensor=tensor.name, attempt=attempt + 1)
            if attempt == self.options.max_retries:
                break
            with self._lock:
                self.status.retries += 1
            os.pwrite(fd, self._get(tensor.offset, tensor.end), tensor.offset)
        raise ChecksumError(
            f"tensor {tensor.name} of {self.manifest.name} failed its sha256 check "
            f"{self.options.max_retries + 1} times (bytes [{tensor.offset}, {tensor.end}) "
            f"of {self.store.ref.uri}); the stored object is corrupt: push the model again"
        )
