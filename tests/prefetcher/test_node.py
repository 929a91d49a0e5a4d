"""The node prefetcher: its HTTP API, cache accounting, LRU eviction and priorities."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from hydraserve.prefetcher.api import create_app
from hydraserve.prefetcher.fetcher import FetchOptions
from hydraserve.prefetcher.node import Prefetcher, PreloadRequest
from hydraserve.prefetcher.shm import FetchState, ModelShm
from hydraserve.store import ModelRef, ModelStore

FAST = FetchOptions(concurrency=4, chunk_bytes=64 << 10, backoff_seconds=0.01)


def make_prefetcher(tmp_path: Path, capacity: int = 1 << 30) -> Prefetcher:
    return Prefetcher("node-a", tmp_path / "shm", capacity, options=FAST)


def test_preload_over_http_then_status(local_store: ModelStore, tmp_path: Path) -> None:
    prefetcher = make_prefetcher(tmp_path)
    client = TestClient(create_app(prefetcher))
    uri = local_store.ref.uri
    resp = client.post("/v1/preload", json={"uri": uri, "pp": 2, "rank": 0})
    assert resp.status_code == 202
    prefetcher.wait(uri, "main", timeout=30)
    status = client.get("/v1/status").json()
    (model,) = status["models"]
    assert model["fetches"]["pp2-rank0"]["state"] == "done"
    assert model["complete"] is False
    manifest = local_store.manifest()
    stage_bytes = manifest.stage(2, 0).nbytes + manifest.header_size
    # Sparse file: memory held is about the stage, not the whole model.
    assert stage_bytes <= model["memory_bytes"] < stage_bytes + (1 << 20)
    assert status["bytes_from_store"] == stage_bytes
    # Idempotent: a second preload moves no bytes.
    assert client.post("/v1/preload", json={"uri": uri, "pp": 2, "rank": 0}).status_code == 202
    prefetcher.wait(uri, "main", timeout=30)
    assert client.get("/v1/status").json()["bytes_from_store"] == stage_bytes
    metrics = client.get("/metrics").text
    assert f"hydraserve_prefetcher_store_bytes {float(stage_bytes)}" in metrics


def test_whole_model_makes_it_complete(local_store: ModelStore, tmp_path: Path) -> None:
    prefetcher = make_prefetcher(tmp_path)
    prefetcher.preload(PreloadRequest(uri=local_store.ref.uri))
    prefetcher.wait(local_store.ref.uri, "main", timeout=30)
    (holding,) = prefetcher.status().models
    assert holding.complete
    assert holding.key == f"{local_store.ref.uri}@main"
    # Every stage is now satisfied without another fetch.
    status = prefetcher.preload(PreloadRequest(uri=local_store.ref.uri, pp=4, rank=2))
    assert status.state == FetchState.DONE
    manifest = local_store.manifest()
    assert prefetcher.status().bytes_from_store == manifest.total_bytes + manifest.header_size


def test_bad_requests(local_store: ModelStore, tmp_path: Path) -> None:
    client = TestClient(create_app(make_prefetcher(tmp_path)))
    missing = client.post("/v1/preload", json={"uri": str(tmp_path / "nope")})
    assert missing.status_code == 404 and "hydraserve model push" in missing.json()["detail"]
    half = client.post("/v1/preload", json={"uri": local_store.ref.uri, "pp": 2})
    assert half.status_code == 422
    too_big = client.post("/v1/preload", json={"uri": local_store.ref.uri, "pp": 9, "rank": 0})
    assert too_big.status_code == 422


def test_lru_eviction_under_capacity(
    demo_checkpoint: Path, local_store: ModelStore, tmp_path: Path
) -> None:
    other = ModelStore(ModelRef(str(tmp_path / "store" / "other")))
    other.push(demo_checkpoint)
    size = local_store.manifest().total_bytes
    prefetcher = make_prefetcher(tmp_path, capacity=int(size * 1.5))
    prefetcher.preload(PreloadRequest(uri=local_store.ref.uri))
    prefetcher.wait(local_store.ref.uri, "main", timeout=30)
    prefetcher.preload(PreloadRequest(uri=other.ref.uri))
    prefetcher.wait(other.ref.uri, "main", timeout=30)
    held = [m.uri for m in prefetcher.status().models]
    assert held == [other.ref.uri]
    assert not ModelShm(tmp_path / "shm", local_store.ref.uri, "main").dir.exists()


class GatedStore(ModelStore):
    """A real store whose reads wait for a gate (to hold a fetch in flight)."""

    def __init__(self, inner: ModelStore, gate: threading.Event) -> None:
        super().__init__(inner.ref)
        self.gate = gate
        self.entered = threading.Event()  # a read is in flight (held at the gate)

    def read_range(self, start: int, end: int) -> bytes:
        self.entered.set()
        self.gate.wait(10)
        return super().read_range(start, end)


class RecordingStore(ModelStore):
    """A real store that notes, at each read, whether ``busy()`` held (a cold-start fetch
    still running on the node)."""

    def __init__(self, inner: ModelStore, busy: Callable[[], bool]) -> None:
        super().__init__(inner.ref)
        self.busy = busy
        self.reads: list[bool] = []

    def read_range(self, start: int, end: int) -> bytes:
        self.reads.append(self.busy())
        return super().read_range(start, end)


class WatchedPrefetcher(Prefetcher):
    """Sets ``asked`` when a low-priority fetch first asks to read (reaches its gate)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.asked = threading.Event()

    def _low_priority_gate(self) -> None:
        self.asked.set()
        super()._low_priority_gate()


def test_low_priority_fetch_waits_for_cold_start_fetches(
    demo_checkpoint: Path, local_store: ModelStore, tmp_path: Path
) -> None:
    other = ModelStore(ModelRef(str(tmp_path / "store" / "other")))
    other.push(demo_checkpoint)
    gate = threading.Event()
    cold = GatedStore(local_store, gate)

    def cold_start_running() -> bool:
        held = {m.uri: m for m in prefetcher.status().models}
        return held[local_store.ref.uri].fetches["pp2-rank0"].state != FetchState.DONE

    background = RecordingStore(other, cold_start_running)

    def stores(ref: ModelRef) -> ModelStore:
        # The cold-start model's reads wait for the gate, holding its fetch in flight.
        return cold if ref.uri == local_store.ref.uri else background

    prefetcher = WatchedPrefetcher(
        "node-a", tmp_path / "shm", 1 << 30, options=FAST, store_factory=stores
    )
    prefetcher.preload(PreloadRequest(uri=local_store.ref.uri, pp=2, rank=0))
    prefetcher.preload(PreloadRequest(uri=other.ref.uri, low_priority=True))
    # Both fetches are under way: the cold start's first read is held at the gate, and the
    # low-priority fetch has asked for its first bytes.
    assert cold.entered.wait(10) and prefetcher.asked.wait(10)
    held = {m.uri: m for m in prefetcher.status().models}
    assert held[other.ref.uri].fetches["full"].fetched == 0
    assert held[local_store.ref.uri].fetches["pp2-rank0"].state == FetchState.FETCHING
    gate.set()
    prefetcher.wait(local_store.ref.uri, "main", timeout=30)
    prefetcher.wait(other.ref.uri, "main", timeout=30)
    held = {m.uri: m for m in prefetcher.status().models}
    assert held[other.ref.uri].complete
    # Not one of its reads ran while the cold-start fetch did.
    assert background.reads and not any(background.reads)


@pytest.mark.parametrize("pp,rank", [(1, 0), (3, 2)])
def test_stage_names(local_store: ModelStore, tmp_path: Path, pp: int, rank: int) -> None:
    prefetcher = make_prefetcher(tmp_path)
    prefetcher.preload(PreloadRequest(uri=local_store.ref.uri, pp=pp, rank=rank))
    prefetcher.wait(local_store.ref.uri, "main", timeout=30)
    (holding,) = prefetcher.status().models
    assert holding.fetches[f"pp{pp}-rank{rank}"].state == FetchState.DONE


def test_a_whole_model_fetch_checks_held_stages_in_place_and_moves_only_the_rest(
    local_store: ModelStore, tmp_path: Path
) -> None:
    # Consolidation: a node holding stage 0 fetches the rest of the model in the background.
    prefetcher = make_prefetcher(tmp_path)
    uri = local_store.ref.uri
    prefetcher.preload(PreloadRequest(uri=uri, pp=2, rank=0))
    prefetcher.wait(uri, "main", timeout=30)
    moved_for_stage = prefetcher.status().bytes_from_store
    prefetcher.preload(PreloadRequest(uri=uri, low_priority=True))
    prefetcher.wait(uri, "main", timeout=30)
    (holding,) = prefetcher.status().models
    assert holding.complete
    manifest = local_store.manifest()
    stage1_only = manifest.stage(2, 1).nbytes
    assert prefetcher.status().bytes_from_store - moved_for_stage == stage1_only
    # Every byte is verified: the whole model reads back as the store has it.
    shm = ModelShm(tmp_path / "shm", uri, "main")
    data = shm.weights_path.read_bytes()
    for tensor in manifest.tensors:
        assert data[tensor.offset : tensor.end] == local_store.read_tensor(tensor.name)
