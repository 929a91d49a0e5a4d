"""Compile artifacts as model data (decision 0601): what a start wrote to its compile cache
goes to the store and comes back into another node's empty cache; corrupt, mismatched,
hostile or oversized artifacts are never used. A real store (files), real tar archives;
the engine's cache is played by files laid out as vLLM lays them out."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from pathlib import Path

import pytest
import structlog

from hydraserve.store import ModelRef, ModelStore
from hydraserve.worker.artifacts import (
    ArtifactRecord,
    artifact_key,
    cache_entry,
    cache_files,
    publish,
    restore,
)
from hydraserve.worker.launcher import stage_flags

ENGINE = "vllm 0.32.0"
KEY = "k1"
SCOPE = "team-a"


def compile_into(cache_root: Path, digest: str, payload: bytes = b"kernel") -> list[str]:
    """Files as vLLM's AOT compile writes them for one config hash, plus a model inspection."""
    entry = cache_root / "torch_compile_cache" / "torch_aot_compile" / digest
    files = {
        entry / "rank_0_0" / "model": payload,
        entry / "inductor_cache" / "ab" / "cab.so": payload * 2,
        cache_root / "modelinfos" / "vllm-llama.json": b"{}",
    }
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return sorted(str(p.relative_to(cache_root)) for p in files)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(ModelRef(str(tmp_path / "store" / "m")))


def first_start(store: ModelStore, cache: Path) -> ArtifactRecord:
    restored = restore(store, SCOPE, KEY, cache)
    assert restored.state == "missing"
    before = cache_files(cache)
    compile_into(cache, "aaa")
    record = publish(store, SCOPE, KEY, ENGINE, cache, before, restored, 1 << 20)
    assert record is not None
    return record


def test_an_artifact_comes_back_into_another_nodes_empty_cache(
    store: ModelStore, tmp_path: Path
) -> None:
    node_a, node_b = tmp_path / "a", tmp_path / "b"
    record = first_start(store, node_a)
    assert record.files == 3 and record.engine == ENGINE

    restored = restore(store, SCOPE, KEY, node_b)
    assert (restored.state, restored.files) == ("restored", 3)
    assert {p: (node_b / p).read_bytes() for p in cache_files(node_b)} == {
        p: (node_a / p).read_bytes() for p in cache_files(node_a)
    }
    # The engine found what it needed and wrote nothing: nothing to publish, "used" logged.
    with structlog.testing.capture_logs() as events:
        unchanged = cache_files(node_b)
        assert publish(store, SCOPE, KEY, ENGINE, node_b, unchanged, restored, 1 << 20) is None
    assert [e["event"] for e in events] == ["artifacts.used"]
    # Another tenant's workers never see it.
    assert restore(store, "team-b", KEY, tmp_path / "c").state == "missing"


def test_a_corrupt_artifact_is_not_unpacked_and_the_next_start_replaces_it(
    store: ModelStore, tmp_path: Path
) -> None:
    first_start(store, tmp_path / "a")
    tar_key = f"artifacts/{SCOPE}/{KEY}.tar"
    data = bytearray(store.backend.read(tar_key))
    data[len(data) // 2] ^= 0xFF
    store.backend.write(tar_key, bytes(data))

    node_b = tmp_path / "b"
    with structlog.testing.capture_logs() as events:
        restored = restore(store, SCOPE, KEY, node_b)
    assert restored.state == "corrupt"
    assert [e["event"] for e in events] == ["artifacts.corrupt"]
    assert cache_files(node_b) == {}  # nothing of it reached the cache
    # The engine compiles as on a first start; its artifact replaces the corrupt one.
    before = cache_files(node_b)
    compile_into(node_b, "aaa")
    assert publish(store, SCOPE, KEY, ENGINE, node_b, before, restored, 1 << 20) is not None
    assert restore(store, SCOPE, KEY, tmp_path / "c").state == "restored"


def test_a_mismatched_artifact_is_left_unused_and_replaced(
    store: ModelStore, tmp_path: Path
) -> None:
    """vLLM names its cache entries by a hash of config, code and compiler: an artifact
    from another engine build sits there unused while the engine compiles its own."""
    first_start(store, tmp_path / "a")
    node_b = tmp_path / "b"
    restored = restore(store, SCOPE, KEY, node_b)
    before = cache_files(node_b)
    compile_into(node_b, "bbb", payload=b"other build")
    with structlog.testing.capture_logs() as events:
        record = publish(store, SCOPE, KEY, ENGINE, node_b, before, restored, 1 << 20)
    assert [e["event"] for e in events] == ["artifacts.refreshed", "artifacts.published"]
    assert record is not None
    node_c = tmp_path / "c"
    restore(store, SCOPE, KEY, node_c)
    entries = {cache_entry(p) for p in cache_files(node_c)}
    assert "torch_compile_cache/torch_aot_compile/bbb" in entries
    assert "torch_compile_cache/torch_aot_compile/aaa" not in entries  # only what was written


def test_a_hostile_archive_cannot_write_outside_the_cache(
    store: ModelStore, tmp_path: Path
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name in (
            "../escaped",
            "/etc/hydraserve-evil",
            "torch_compile_cache/../../up",
            "other/x",
        ):
            info = tarfile.TarInfo(name)
            info.size = 4
            archive.addfile(info, io.BytesIO(b"evil"))
        link = tarfile.TarInfo("torch_compile_cache/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    data = buffer.getvalue()
    record = ArtifactRecord(
        key=KEY, sha256=hashlib.sha256(data).hexdigest(), size=len(data), files=5,
        engine=ENGINE, created_at=time.time(),
    )  # fmt: skip
    store.backend.write(f"artifacts/{SCOPE}/{KEY}.tar", data)
    store.backend.write(f"artifacts/{SCOPE}/{KEY}.json", record.model_dump_json().encode())
    cache = tmp_path / "deep" / "cache"
    with structlog.testing.capture_logs() as events:
        restored = restore(store, SCOPE, KEY, cache)
    assert restored.state == "refused"
    assert [e["event"] for e in events] == ["artifacts.refused"]
    assert restored.files == 0
    assert not (tmp_path / "deep" / "escaped").exists() and not (tmp_path / "up").exists()
    assert not Path("/etc/hydraserve-evil").exists()
    assert not (cache / "other").exists() and not (cache / "torch_compile_cache" / "link").exists()


def test_an_oversized_artifact_is_not_stored(store: ModelStore, tmp_path: Path) -> None:
    cache = tmp_path / "a"
    restored = restore(store, SCOPE, KEY, cache)
    before = cache_files(cache)
    compile_into(cache, "aaa", payload=b"x" * 100_000)
    assert publish(store, SCOPE, KEY, ENGINE, cache, before, restored, 50_000) is None
    assert restore(store, SCOPE, KEY, tmp_path / "b").state == "missing"


def test_the_key_separates_what_compiles_differently_and_ignores_addresses() -> None:
    a = ["serve", "/m", "--host", "10.0.0.1", "--port", "8000", "--max-num-batched-tokens", "256"]
    b = ["serve", "/m", "--host", "10.0.0.2", "--port", "9000", "--max-num-batched-tokens", "256"]
    a += ["--model-loader-extra-config", '{"instance": "m-1", "shm_dir": "/dev/shm/a"}']
    b += ["--model-loader-extra-config", '{"instance": "m-2", "shm_dir": "/dev/shm/b"}']
    assert stage_flags(a) == stage_flags(b) == ["serve", "/m", "--max-num-batched-tokens", "256"]
    base = artifact_key(ENGINE, "cpu", stage_flags(a), 2, 0)
    assert base == artifact_key(ENGINE, "cpu", stage_flags(b), 2, 0)
    assert len({
        base,
        artifact_key("vllm 0.33.0", "cpu", stage_flags(a), 2, 0),
        artifact_key(ENGINE, "cuda", stage_flags(a), 2, 0),
        artifact_key(ENGINE, "cpu", stage_flags(a), 2, 1),
        artifact_key(ENGINE, "cpu", [*stage_flags(a), "--enforce-eager"], 2, 0),
    }) == 5  # fmt: skip
