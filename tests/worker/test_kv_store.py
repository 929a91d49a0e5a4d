"""The shared-memory KV store's layout and what a consumer may load (no engine needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hydraserve.worker.kv_store import KVStore, SavedRequest, loadable_tokens, safe_key


def test_a_save_is_complete_when_the_workers_cover_every_layer(tmp_path: Path) -> None:
    store = KVStore(tmp_path)
    store.begin("req-1", list(range(64)), 32)
    assert store.saved("req-1") == SavedRequest(list(range(64)), 32)
    # A two-stage pipeline: each stage's worker writes its own layers.
    store.write_layer("req-1", "layers.0", b"\x01" * 8, [2, 4], "bfloat16")
    store.finish("req-1", ["layers.0"])
    assert store.complete_layers("req-1") == {"layers.0"}
    assert {"layers.0", "layers.1"} > store.complete_layers("req-1")
    store.write_layer("req-1", "layers.1", b"\x02" * 8, [2, 4], "bfloat16")
    (store.dir("req-1") / f"done-{os.getpid() + 1}.json").write_text('["layers.1"]')
    assert store.complete_layers("req-1") == {"layers.0", "layers.1"}
    assert store.layer("req-1", "layers.1") == (b"\x02" * 8, [2, 4], "bfloat16")
    store.remove("req-1")
    assert store.saved("req-1") is None and store.complete_layers("req-1") == set()


def test_loadable_tokens_are_whole_blocks_of_the_common_prefix_minus_the_last() -> None:
    saved = SavedRequest(tokens=list(range(96)), block_size=32)
    prompt = list(range(80))
    assert loadable_tokens(saved, prompt, 32, computed=0) == 64
    assert loadable_tokens(saved, prompt, 32, computed=32) == 32  # local prefix cache hit
    assert loadable_tokens(saved, list(range(64)), 32, computed=0) == 32  # keep one to compute
    diverged = [*range(40), 999, *range(41, 80)]
    assert loadable_tokens(saved, diverged, 32, computed=0) == 32
    assert loadable_tokens(saved, prompt, 16, computed=0) == 0  # other block size: recompute
    assert loadable_tokens(saved, list(range(20)), 32, computed=0) == 0


def test_keys_cannot_escape_the_store_and_stale_saves_are_swept(tmp_path: Path) -> None:
    assert safe_key("../../etc/passwd") == "_.._etc_passwd"
    with pytest.raises(ValueError):
        safe_key("..")
    store = KVStore(tmp_path / "kv")
    assert store.sweep(60) == 0  # no store yet
    store.begin("old", [1], 32)
    store.begin("new", [1], 32)
    old = store.dir("old")
    os.utime(old, (1000.0, 1000.0))
    assert store.sweep(60, now=2000.0) == 1
    assert not old.exists() and store.dir("new").exists()
