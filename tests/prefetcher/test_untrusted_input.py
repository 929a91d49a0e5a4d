"""The prefetcher trusts no request: names cannot leave its directory, fetches cannot fill
the node past its capacity, and KV areas are made for one user only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from hydraserve.prefetcher.api import create_app
from hydraserve.prefetcher.fetcher import FetchOptions
from hydraserve.prefetcher.node import Prefetcher
from hydraserve.store import ModelStore

FAST = FetchOptions(concurrency=2, chunk_bytes=64 << 10, backoff_seconds=0.01)


def _client(tmp_path: Path, capacity: int = 1 << 30) -> tuple[Prefetcher, TestClient]:
    prefetcher = Prefetcher("node-a", tmp_path / "shm", capacity, options=FAST)
    return prefetcher, TestClient(create_app(prefetcher))


@pytest.mark.parametrize(
    "body",
    [
        {"uri": "s3://models/../../etc"},
        {"uri": "file:///srv/models/../../etc/shadow"},
        {"uri": "/srv/models/a", "revision": ".."},
        {"uri": "/srv/models/a", "revision": "../../x"},
        {"uri": "http://evil.example/model"},
        {"uri": "s3://models/a", "pp": 9, "rank": 0},
    ],
)
def test_preload_refuses_names_that_leave_its_directory(tmp_path: Path, body: dict) -> None:
    _, client = _client(tmp_path)
    resp = client.post("/v1/preload", json=body)
    assert resp.status_code == 422, resp.text
    assert not (tmp_path / "shm").exists() or list((tmp_path / "shm").iterdir()) == []
    if "pp" not in body:  # eviction names a model revision only
        assert client.post("/v1/evict", json=body).status_code == 422


def test_a_fetch_past_capacity_is_refused(tmp_path: Path, local_store: ModelStore) -> None:
    size = local_store.manifest().weights_size
    prefetcher, client = _client(tmp_path, capacity=size // 2)
    resp = client.post("/v1/preload", json={"uri": local_store.ref.uri})
    assert resp.status_code == 507
    assert "capacity" in resp.json()["detail"]
    assert prefetcher.status().used_bytes == 0  # nothing was written


@pytest.mark.parametrize("area", ["..", ".hidden", "a%2Fb", "x" * 200])
def test_kv_area_names_are_one_safe_component(tmp_path: Path, area: str) -> None:
    _, client = _client(tmp_path)
    assert client.put(f"/v1/kv-areas/{area}", json={"uid": 10001}).status_code in (404, 422)
    assert not (tmp_path / "shm" / "kv").exists()


def test_kv_area_belongs_to_the_workers_user_alone(tmp_path: Path) -> None:
    _, client = _client(tmp_path)
    resp = client.put("/v1/kv-areas/team-a.llama-abcde", json={"uid": 10001, "gid": 10001})
    assert resp.status_code == 200, resp.text
    path = Path(resp.json()["path"])
    assert path == tmp_path / "shm" / "kv" / "team-a.llama-abcde"
    info = path.stat()
    assert stat.S_IMODE(info.st_mode) == 0o700
    if os.geteuid() == 0:  # only root can give it away
        assert (info.st_uid, info.st_gid) == (10001, 10001)
    assert client.put("/v1/kv-areas/a", json={"uid": 0}).status_code == 422  # never root
    assert client.delete("/v1/kv-areas/team-a.llama-abcde").json() == {"deleted": True}
    assert not path.exists()
