"""Store faults over real sockets: an S3 server behind a fault-injecting TCP proxy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from hydraserve.prefetcher.fetcher import FetchOptions
from hydraserve.prefetcher.node import Prefetcher, PreloadRequest
from hydraserve.prefetcher.shm import FetchState
from hydraserve.settings import S3Settings
from hydraserve.store import ModelRef, ModelStore, StoreError
from hydraserve.store.demo import make_demo_model
from tests.support.faultproxy import FaultProxy

URI = "s3://faults/small"
OPTIONS = FetchOptions(concurrency=4, chunk_bytes=256 << 10, backoff_seconds=0.2,
                       max_backoff_seconds=1.0, max_retries=6)  # fmt: skip


@pytest.fixture(scope="module")
def pushed_small(s3_server: S3Settings, tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    checkpoint = make_demo_model(tmp_path_factory.mktemp("small") / "hf", "small")
    store = ModelStore(ModelRef(URI), s3_server)
    store.push(checkpoint)
    return store


@pytest.fixture
def proxy(s3_server: S3Settings) -> Iterator[FaultProxy]:
    endpoint = urlparse(s3_server.endpoint_url)
    assert endpoint.hostname and endpoint.port
    proxy = FaultProxy(endpoint.hostname, endpoint.port, rate_bytes_per_s=1 << 20).start()
    yield proxy
    proxy.stop()


def through(proxy: FaultProxy, tmp_path: Path) -> Prefetcher:
    s3 = S3Settings(endpoint_url=f"http://127.0.0.1:{proxy.port}")
    return Prefetcher("node-a", tmp_path / "shm", 1 << 30, s3=s3, options=OPTIONS)


def wait_until(predicate: object, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError


def fetch_of(prefetcher: Prefetcher) -> FetchState | None:
    models = prefetcher.status().models
    return models[0].fetches["full"].state if models and "full" in models[0].fetches else None


def assert_identical_to_store(prefetcher: Prefetcher, store: ModelStore) -> None:
    model = prefetcher._models[(URI, "main")]
    data = model.shm.weights_path.read_bytes()
    for tensor in store.manifest().tensors:
        assert data[tensor.offset : tensor.end] == store.read_tensor(tensor.name), tensor.name


def test_store_outage_mid_fetch_is_ridden_out(
    pushed_small: ModelStore, proxy: FaultProxy, tmp_path: Path
) -> None:
    prefetcher = through(proxy, tmp_path)
    prefetcher.preload(PreloadRequest(uri=URI))
    total = pushed_small.manifest().weights_size
    wait_until(lambda: prefetcher.status().models[0].fetches["full"].fetched > 0, 10)
    proxy.cut()  # the store vanishes mid-fetch
    # The fetch has met the outage on several attempts (connections refused) ...
    refused = proxy.refused
    wait_until(lambda: proxy.refused >= refused + 3, 10)
    status = prefetcher.status().models[0].fetches["full"]
    # ... and rides it out instead of failing.
    assert status.state == FetchState.FETCHING and status.fetched < total
    proxy.resume()
    prefetcher.wait(URI, "main", timeout=60)
    status = prefetcher.status().models[0].fetches["full"]
    assert status.state == FetchState.DONE
    assert status.retries >= 1
    assert_identical_to_store(prefetcher, pushed_small)


def test_store_that_stays_down_fails_with_a_clear_error(
    pushed_small: ModelStore, proxy: FaultProxy, tmp_path: Path
) -> None:
    prefetcher = through(proxy, tmp_path)
    prefetcher.preload(PreloadRequest(uri=URI, pp=2, rank=1))
    wait_until(lambda: prefetcher.status().models[0].fetches["pp2-rank1"].fetched > 0, 10)
    proxy.cut()  # and it never comes back
    prefetcher.wait(URI, "main", timeout=60)
    status = prefetcher.status().models[0].fetches["pp2-rank1"]
    assert status.state == FetchState.FAILED
    assert "Check that the store is reachable" in (status.error or "")
    assert status.verified < status.total  # what arrived stays verified; the rest never will


def test_a_corrupted_manifest_read_is_retried(
    pushed_small: ModelStore, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.corrupt_next_response(at_byte=300)
    prefetcher = through(proxy, tmp_path)
    prefetcher.preload(PreloadRequest(uri=URI, pp=4, rank=3))
    prefetcher.wait(URI, "main", timeout=60)
    assert prefetcher.status().models[0].fetches["pp4-rank3"].state == FetchState.DONE


def test_preload_with_the_store_down_is_refused_clearly(
    pushed_small: ModelStore, proxy: FaultProxy, tmp_path: Path
) -> None:
    proxy.cut()
    with pytest.raises(StoreError, match=r"manifest\.json"):
        through(proxy, tmp_path).preload(PreloadRequest(uri=URI))


def test_bytes_corrupted_in_flight_are_fetched_again(
    pushed_small: ModelStore, proxy: FaultProxy, tmp_path: Path
) -> None:
    prefetcher = through(proxy, tmp_path)
    prefetcher.preload(PreloadRequest(uri=URI, pp=4, rank=0))  # reads the manifest
    prefetcher.wait(URI, "main", timeout=60)
    proxy.corrupt_next_response(at_byte=3000)  # inside the next ranged GET's body
    prefetcher.preload(PreloadRequest(uri=URI))
    prefetcher.wait(URI, "main", timeout=60)
    status = prefetcher.status().models[0].fetches["full"]
    assert proxy.corrupted == 1, proxy.connections
    assert status.state == FetchState.DONE
    assert status.retries >= 1  # the checksum caught it and the range came again
    assert_identical_to_store(prefetcher, pushed_small)
