"""Where moved KV caches wait in a node's shared memory, and what a consumer may load (pure
of torch and vLLM, so it is testable on its own; :mod:`hydraserve.worker.kv_connector` is
the engine side).

One directory per saved request, named by the key the gateway chose::

    <store>/<key>/meta.json            tokens whose KV is saved, block size (the producer's
                                       scheduler writes it when the request is aborted)
    <store>/<key>/<layer>.kv           raw bytes of that layer's saved blocks, in order
    <store>/<key>/<layer>.json         their shape and dtype
    <store>/<key>/done-<pid>.json      layers a worker process finished (a pipeline has
                                       one per stage); the save is complete when they
                                       cover every layer the consumer has

Files appear with an atomic rename, so a reader never sees half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


def safe_key(key: str) -> str:
    """A key as a directory name (no separators, bounded)."""
    cleaned = _UNSAFE.sub("_", key)[:128].lstrip(".")
    if not cleaned:
        raise ValueError(f"unusable KV key {key!r}")
    return cleaned


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


@dataclass(frozen=True)
class SavedRequest:
    tokens: list[int]  # the token ids whose KV is saved (whole blocks from position 0)
    block_size: int


class KVStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def dir(self, key: str) -> Path:
        return self.root / safe_key(key)

    # --- producer ---------------------------------------------------------------------

    def begin(self, key: str, tokens: Sequence[int], block_size: int) -> Path:
        path = self.dir(key)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / "meta.json", {"tokens": list(tokens), "block_size": block_size})
        return path

    def write_layer(
        self, key: str, layer: str, data: bytes, shape: Sequence[int], dtype: str
    ) -> None:
        path = self.dir(key)
        target = path / f"{layer}.kv"
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)
        write_json(path / f"{layer}.json", {"shape": list(shape), "dtype": dtype})

    def finish(self, key: str, layers: Iterable[str]) -> None:
        write_json(self.dir(key) / f"done-{os.getpid()}.json", sorted(layers))

    # --- consumer ---------------------------------------------------------------------

    def saved(self, key: str) -> SavedRequest | None:
        try:
            meta = json.loads((self.dir(key) / "meta.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return SavedRequest(
            tokens=[int(t) for t in meta["tokens"]], block_size=int(meta["block_size"])
        )

    def complete_layers(self, key: str) -> set[str]:
        layers: set[str] = set()
        for done in self.dir(key).glob("done-*.json"):
            try:
                layers.update(json.loads(done.read_text()))
            except (FileNotFoundError, ValueError):
                continue
        return layers

    def layer(self, key: str, layer: str) -> tuple[bytes, list[int], str]:
        path = self.dir(key)
        info = json.loads((path / f"{layer}.json").read_text())
        return (path / f"{layer}.kv").read_bytes(), list(info["shape"]), str(info["dtype"])

    def remove(self, key: str) -> None:
        shutil.rmtree(self.dir(key), ignore_errors=True)

    def sweep(self, max_age_seconds: float, now: float | None = None) -> int:
        """Remove saves nobody loaded (the gateway recomputed, or the client left)."""
        now = time.time() if now is None else now
        removed = 0
        try:
            entries = list(self.root.iterdir())
        except FileNotFoundError:
            return 0
        for entry in entries:
            try:
                if now - entry.stat().st_mtime > max_age_seconds:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def loadable_tokens(
    saved: SavedRequest, prompt: Sequence[int], block_size: int, computed: int
) -> int:
    """How many tokens past ``computed`` a consumer can load from ``saved`` for ``prompt``:
    whole blocks of the longest common prefix, leaving at least the prompt's last token to
    compute (the engine needs one forward step to sample from). 0 when block sizes differ."""
    if saved.block_size != block_size or block_size <= 0:
        return 0
    common = 0
    for a, b in zip(saved.tokens, prompt, strict=False):
        if a != b:
            break
        common += 1
    usable = min(common, len(prompt) - 1)
    aligned = usable // block_size * block_size
    return max(0, aligned - computed)
