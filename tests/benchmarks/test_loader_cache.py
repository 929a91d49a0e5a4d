"""The loader benchmark's cache-state helpers: resident bytes and per-file eviction."""

from __future__ import annotations

from pathlib import Path

from benchmarks.loader.run import evict, resident_bytes


def test_a_file_just_read_is_resident_and_eviction_never_adds(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x01" * (1 << 20))
    assert path.read_bytes()[:1] == b"\x01"
    assert resident_bytes(path) == 1 << 20  # just written and read: in the page cache
    left = evict(path)
    assert 0 <= left <= 1 << 20  # 0 where the filesystem honours DONTNEED (not tmpfs)


def test_an_empty_file_has_nothing_resident(tmp_path: Path) -> None:
    path = tmp_path / "empty"
    path.touch()
    assert resident_bytes(path) == 0
