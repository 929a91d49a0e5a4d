"""The node prefetcher: fetches, cache accounting and LRU eviction for one node.

The HTTP service (:mod:`hydraserve.prefetcher.api`) and the embedded platform both drive
this class. Shared memory is the cache: every model revision a node has fetched stays in
``/dev/shm`` (as a sparse file holding the fetched ranges) until evicted. Whole models are
what the planner can place a cached cold start on; when a new fetch needs room, complete
models not fetched for the longest time go first.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, Field

from hydraserve.api.models import REVISION_PATTERN, SOURCE_URI_PATTERN
from hydraserve.logs import get_logger
from hydraserve.prefetcher.fetcher import FetchOptions, RangeFetcher, subtract_ranges
from hydraserve.prefetcher.shm import (
    FetchState,
    FetchStatus,
    ModelShm,
    fetch_name,
    kv_area_dir,
    write_json_atomic,
)
from hydraserve.settings import S3Settings
from hydraserve.store import Manifest, ModelRef, ModelStore
from hydraserve.store.manifest import merge_ranges

log = get_logger("prefetcher")


class OverCapacity(RuntimeError):
    """A fetch would take the node's shared memory past the prefetcher's capacity."""


class PreloadRequest(BaseModel):
    # Validated as a ServerlessModel's source is: no request can name a path outside
    # the store prefix it gives, or a shared-memory directory outside this node's.
    uri: str = Field(
        pattern=SOURCE_URI_PATTERN, max_length=1024, description="Model location in the store."
    )
    revision: str = Field(default="main", pattern=REVISION_PATTERN, max_length=128)
    pp: int | None = Field(default=None, ge=1, le=4, description="None: the whole model.")
    rank: int | None = Field(default=None, ge=0, le=3)
    low_priority: bool = Field(
        default=False, description="Background fetch (consolidation): yields to cold starts."
    )
    deadline: float | None = Field(
        default=None,
        description="Epoch seconds by which the caller's plan needs the bytes (the "
        "planner's fetch deadline); reported in the status so later plans do not admit a "
        "fetch that would make this one late. None: no deadline.",
    )


class ModelHolding(BaseModel):
    uri: str
    revision: str
    name: str
    key: str
    memory_bytes: int
    complete: bool = Field(description="The whole model is in shared memory, verified.")
    last_used: float
    fetches: dict[str, FetchStatus]


class NodeStatus(BaseModel):
    """``GET /v1/status``: what a node holds and fetches (the operator's view of a node)."""

    node: str
    capacity_bytes: int
    used_bytes: int
    bytes_from_store: int
    models: list[ModelHolding]

    def holding(self, uri: str, revision: str) -> ModelHolding | None:
        return next((m for m in self.models if m.uri == uri and m.revision == revision), None)

    def fetch(self, uri: str, revision: str, name: str) -> FetchStatus | None:
        """One fetch of a model (``fetch_name(pp, rank)``; ``full``: the whole model)."""
        holding = self.holding(uri, revision)
        return None if holding is None else holding.fetches.get(name)


@dataclass
class _Model:
    shm: ModelShm
    store: ModelStore
    manifest: Manifest
    last_used: float
    fetchers: dict[str, RangeFetcher] = field(default_factory=dict)
    threads: dict[str, threading.Thread] = field(default_factory=dict)


class Prefetcher:
    def __init__(
        self,
        node: str,
        shm_dir: Path,
        capacity_bytes: int,
        s3: S3Settings | None = None,
        options: FetchOptions | None = None,
        store_factory: Callable[[ModelRef], ModelStore] | None = None,
    ) -> None:
        self.node = node
        self.store_factory = store_factory or (lambda ref: ModelStore(ref, s3))
        self.shm_dir = Path(shm_dir)
        self.capacity_bytes = capacity_bytes
        self.s3 = s3
        self.options = options or FetchOptions()
        self._models: dict[tuple[str, str], _Model] = {}
        self._lock = threading.RLock()
        self._bytes_from_store = 0
        self._normal_active = 0
        self._normal_idle = threading.Condition(self._lock)

    # -- public API ----------------------------------------------------------------------

    def preload(self, request: PreloadRequest) -> FetchStatus:
        """Start fetching a stage (or the whole model); idempotent."""
        if (request.pp is None) != (request.rank is None):
            raise ValueError("give both pp and rank for a stage, or neither for the whole model")
        model = self._model(request.uri, request.revision)
        manifest = model.manifest
        name = fetch_name(request.pp, request.rank)
        with self._lock:
            model.last_used = time.time()
            existing = model.shm.read_status(name)
            running = name in model.threads and model.threads[name].is_alive()
            if running:
                # A second plan relying on a running fetch: keep the tighter deadline.
                status = model.fetchers[name].status
                if request.deadline is not None:
                    status.deadline = min(request.deadline, status.deadline or request.deadline)
                return existing or status
            if existing and existing.state == FetchState.DONE:
                return existing
            full = model.shm.read_status(fetch_name(None, None))
            if full and full.state == FetchState.DONE:
                return full  # the whole model is here: every stage is satisfied
            ranges = manifest.fetch_ranges(request.pp, request.rank)
            present = self._present(model, exclude=name)
            self._make_room(sum(e - s for s, e in subtract_ranges(ranges, present)), keep=model)
            fetcher = RangeFetcher(
                model.store,
                manifest,
                model.shm,
                name,
                ranges,
                self.options,
                on_bytes=self._count_bytes,
                gate=self._low_priority_gate if request.low_priority else None,
                present=present,
            )
            fetcher.status.deadline = request.deadline
            fetcher.status.low_priority = request.low_priority
            model.fetchers[name] = fetcher
            thread = threading.Thread(
                target=self._run,
                args=(fetcher, request.low_priority),
                daemon=True,
                name=f"fetch-{manifest.name}-{name}",
            )
            model.threads[name] = thread
            if not request.low_priority:
                self._normal_active += 1
            fetcher.status.state = FetchState.FETCHING
            model.shm.write_status(name, fetcher.status)
            thread.start()
            log.info(
                "preload.start",
                node=self.node,
                model=manifest.name,
                fetch=name,
                bytes=fetcher.status.total,
                low_priority=request.low_priority,
            )
            return fetcher.status

    def open_kv_area(self, area: str, uid: int | None, gid: int | None) -> Path:
        """Create an instance's KV hand-over area, writable by its workers' user only
        (they run as ``uid``; the area is mounted into that instance's pods alone)."""
        path = kv_area_dir(self.shm_dir, area)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        log.info("kv_area.open", node=self.node, area=area, uid=uid)
        return path

    def close_kv_area(self, area: str) -> bool:
        """Delete an instance's KV area (its pods are gone); whether it existed."""
        path = kv_area_dir(self.shm_dir, area)
        existed = path.exists()
        shutil.rmtree(path, ignore_errors=True)
        if existed:
            log.info("kv_area.close", node=self.node, area=area)
        return existed

    def status(self) -> NodeStatus:
        with self._lock:
            holdings = [self._holding(m) for m in self._models.values()]
            return NodeStatus(
                node=self.node,
                capacity_bytes=self.capacity_bytes,
                used_bytes=sum(h.memory_bytes for h in holdings),
                bytes_from_store=self._bytes_from_store,
                models=holdings,
            )

    def evict(self, uri: str, revision: str) -> bool:
        with self._lock:
            model = self._models.pop((uri, revision), None)
            if model is None:
                return False
            self._evict(model)
            return True

    def wait(self, uri: str, revision: str, timeout: float | None = None) -> None:
        """Block until every fetch of a model has finished (tests, benchmarks)."""
        model = self._models[(uri, revision)]
        for thread in list(model.threads.values()):
            thread.join(timeout)

    def close(self) -> None:
        with self._lock:
            for model in self._models.values():
                for fetcher in model.fetchers.values():
                    fetcher.cancel()

    # -- internals -----------------------------------------------------------------------

    def _model(self, uri: str, revision: str) -> _Model:
        with self._lock:
            model = self._models.get((uri, revision))
            if model is None:
                store = self.store_factory(ModelRef(uri, revision))
                manifest = store.manifest()
                shm = ModelShm(self.shm_dir, uri, revision)
                shm.dir.mkdir(parents=True, exist_ok=True)
                write_json_atomic(shm.manifest_path, manifest.model_dump(mode="json"))
                model = _Model(shm=shm, store=store, manifest=manifest, last_used=time.time())
                self._models[(uri, revision)] = model
            return model

    def _run(self, fetcher: RangeFetcher, low_priority: bool) -> None:
        try:
            fetcher.run()
        except Exception as exc:  # published in the state file; log once here
            log.error(
                "preload.failed",
                node=self.node,
                model=fetcher.manifest.name,
                fetch=fetcher.name,
                error=str(exc),
            )
        finally:
            if not low_priority:
                with self._lock:
                    self._normal_active -= 1
                    self._normal_idle.notify_all()

    def _present(self, model: _Model, exclude: str) -> list[tuple[int, int]]:
        """Byte ranges of the model's file that finished fetches on this node verified
        (e.g. the stage a pipeline worker fetched): a whole-model fetch for consolidation
        checks them in place and moves only the rest over the network."""
        present: list[tuple[int, int]] = []
        for path in model.shm.dir.glob("*.state.json"):
            name = path.name.removesuffix(".state.json")
            if name == exclude:
                continue
            status = model.shm.read_status(name)
            if status is not None and status.state == FetchState.DONE:
                present += status.ranges
        return merge_ranges(present)

    def _low_priority_gate(self) -> None:
        """Consolidation fetches pause while a cold-start fetch uses this node's NIC."""
        with self._lock:
            while self._normal_active > 0:
                self._normal_idle.wait(timeout=1.0)

    def _count_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes_from_store += n

    def _holding(self, model: _Model) -> ModelHolding:
        fetches = {}
        for path in model.shm.dir.glob("*.state.json"):
            name = path.name.removesuffix(".state.json")
            status = model.shm.read_status(name)
            if status is not None:
                fetches[name] = status
        full = fetches.get(fetch_name(None, None))
        return ModelHolding(
            uri=model.shm.uri,
            revision=model.shm.revision,
            name=model.manifest.name,
            key=f"{model.shm.uri}@{model.shm.revision}",
            memory_bytes=model.shm.memory_bytes(),
            complete=bool(full and full.state == FetchState.DONE),
            last_used=model.last_used,
            fetches=fetches,
        )

    def _busy(self, model: _Model) -> bool:
        return any(t.is_alive() for t in model.threads.values())

    def _make_room(self, needed: int, keep: _Model) -> None:
        used = sum(m.shm.memory_bytes() for m in self._models.values())
        victims = sorted(
            (m for m in self._models.values() if m is not keep and not self._busy(m)),
            key=lambda m: m.last_used,
        )
        while used + needed > self.capacity_bytes and victims:
            victim = victims.pop(0)
            used -= victim.shm.memory_bytes()
            self._models.pop((victim.shm.uri, victim.shm.revision), None)
            self._evict(victim)
        if used + needed > self.capacity_bytes:
            log.warning(
                "cache.over_capacity",
                node=self.node,
                used=used,
                needed=needed,
                capacity=self.capacity_bytes,
            )
            raise OverCapacity(
                f"node {self.node}: {needed} more bytes would exceed the cache capacity of "
                f"{self.capacity_bytes} bytes ({used} held by fetches in use); retry when "
                "a model is released, or raise prefetcher.cacheCapacityGiB"
            )

    def _evict(self, model: _Model) -> None:
        for fetcher in model.fetchers.values():
            fetcher.cancel()
        # Workers that still map the file keep their pages until they exit.
        shutil.rmtree(model.shm.dir, ignore_errors=True)
        log.info("cache.evict", node=self.node, model=model.manifest.name)
