"""The fetcher: parallel ranged reads into shared memory, checksums, retries, watermark."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from hydraserve.prefetcher.fetcher import FetchError, FetchOptions, RangeFetcher
from hydraserve.prefetcher.shm import FetchState, ModelShm
from hydraserve.store import ChecksumError, ModelRef, ModelStore, StoreError
from hydraserve.worker.source import StageSource, StageUnavailable

FAST = FetchOptions(concurrency=4, chunk_bytes=64 << 10, backoff_seconds=0.01)


class FlakyStore(ModelStore):
    """A real store whose first reads fail or return a flipped byte (fault injection)."""

    def __init__(self, inner: ModelStore, failures: int = 0, corruptions: int = 0) -> None:
        super().__init__(inner.ref)
        self.failures = failures
        self.corruptions = corruptions
        self.lock = threading.Lock()

    def read_range(self, start: int, end: int) -> bytes:
        with self.lock:
            if self.failures > 0:
                self.failures -= 1
                raise StoreError("connection reset by peer (injected)")
            corrupt = self.corruptions > 0
            if corrupt:
                self.corruptions -= 1
        data = super().read_range(start, end)
        return bytes([data[0] ^ 0xFF]) + data[1:] if corrupt else data


def stage_fetcher(store: ModelStore, shm_dir: Path, pp: int = 2, rank: int = 1) -> RangeFetcher:
    manifest = store.manifest()
    shm = ModelShm(shm_dir, store.ref.uri, store.ref.revision)
    ranges = manifest.fetch_ranges(pp, rank)
    return RangeFetcher(store, manifest, shm, f"pp{pp}-rank{rank}", ranges, FAST)


def test_stage_bytes_land_at_manifest_offsets(local_store: ModelStore, tmp_path: Path) -> None:
    fetcher = stage_fetcher(local_store, tmp_path)
    status = fetcher.run()
    assert status.state == FetchState.DONE
    manifest = local_store.manifest()
    assert status.verified == status.total == manifest.stage(2, 1).nbytes + manifest.header_size
    data = fetcher.shm.weights_path.read_bytes()
    # The header travels with every fetch, so the file is a valid safetensors file.
    assert data[: manifest.header_size] == local_store.read_range(0, manifest.header_size)
    for name in local_store.manifest().stage(2, 1).tensors:
        t = local_store.manifest().tensor(name)
        assert data[t.offset : t.end] == local_store.read_tensor(name)
    # Only this stage's bytes were moved.
    assert status.bytes_from_store == status.total
    assert fetcher.shm.read_status("pp2-rank1") == status


def test_transient_store_errors_are_retried(local_store: ModelStore, tmp_path: Path) -> None:
    flaky = FlakyStore(local_store, failures=3)
    status = stage_fetcher(flaky, tmp_path).run()
    assert status.state == FetchState.DONE
    assert status.retries >= 3


def test_a_corrupted_range_is_fetched_again(local_store: ModelStore, tmp_path: Path) -> None:
    flaky = FlakyStore(local_store, corruptions=1)
    fetcher = stage_fetcher(flaky, tmp_path)
    status = fetcher.run()
    assert status.state == FetchState.DONE and status.retries >= 1
    for name in local_store.manifest().stage(2, 1).tensors:
        t = local_store.manifest().tensor(name)
        assert fetcher.shm.weights_path.read_bytes()[t.offset : t.end] == local_store.read_tensor(
            name
        )


def test_persistent_corruption_fails_naming_the_tensor(
    local_store: ModelStore, tmp_path: Path
) -> None:
    flaky = FlakyStore(local_store, corruptions=10_000)
    fetcher = stage_fetcher(flaky, tmp_path)
    with pytest.raises(
        ChecksumError, match=r"tensor (__header__|model\.\S+) of demo failed its sha256"
    ):
        fetcher.run()
    status = fetcher.shm.read_status("pp2-rank1")
    assert status is not None and status.state == FetchState.FAILED
    assert "push the model again" in (status.error or "")
    assert status.verified == 0


def test_unreachable_store_fails_after_bounded_retries(
    local_store: ModelStore, tmp_path: Path
) -> None:
    flaky = FlakyStore(local_store, failures=10_000)
    with pytest.raises(FetchError, match="failed after 6 attempts"):
        stage_fetcher(flaky, tmp_path).run()


def test_source_waits_for_verified_bytes_and_reports_failures(
    local_store: ModelStore, tmp_path: Path
) -> None:
    manifest = local_store.manifest()
    shm = ModelShm(tmp_path, local_store.ref.uri, local_store.ref.revision)
    source = StageSource(shm, manifest, 2, 0, timeout_seconds=0.2)
    with pytest.raises(StageUnavailable, match="no fetch was started"):
        source.wait_for(source.tensors[0])

    flaky = FlakyStore(local_store, corruptions=10_000)
    with pytest.raises(ChecksumError):
        stage_fetcher(flaky, tmp_path, pp=2, rank=0).run()
    with pytest.raises(StageUnavailable, match="failed its sha256"):
        StageSource(shm, manifest, 2, 0, timeout_seconds=5).wait_for(source.tensors[0])


def test_a_whole_model_fetch_satisfies_any_stage(local_store: ModelStore, tmp_path: Path) -> None:
    manifest = local_store.manifest()
    shm = ModelShm(tmp_path, local_store.ref.uri, local_store.ref.revision)
    RangeFetcher(local_store, manifest, shm, "full", manifest.fetch_ranges(None, None), FAST).run()
    source = StageSource(shm, manifest, 4, 3, timeout_seconds=1)
    for tensor in source.tensors:
        source.wait_for(tensor)
        assert source.buffer()[tensor.offset : tensor.end] == local_store.read_tensor(tensor.name)


def test_fetches_never_straddle_store_parts(demo_checkpoint: Path, tmp_path: Path) -> None:
    store = ModelStore(ModelRef(str(tmp_path / "store" / "parts")))
    manifest = store.push(demo_checkpoint, part_bytes=100_000)
    requests: list[tuple[int, int]] = []

    class Recording(ModelStore):
        def read_range(self, start: int, end: int) -> bytes:
            requests.append((start, end))
            return super().read_range(start, end)

    shm = ModelShm(tmp_path / "shm", store.ref.uri, "main")
    RangeFetcher(
        Recording(store.ref), manifest, shm, "full", manifest.fetch_ranges(None, None), FAST
    ).run()
    assert requests
    for start, end in requests:
        assert len(manifest.parts_overlapping(start, end)) == 1, (start, end)
