"""Compile artifacts as model data (decision 0601).

What vLLM writes to its cache while a stage starts (torch.compile's graphs and kernels,
the model-class inspection) depends on the engine, the device, the stage and its flags,
not on the node. The first start of a stage packs what it wrote and puts it in the store
beside the model, under ``artifacts/<scope>/<key>``; a later start of the same stage on
any node fetches it before the engine starts and unpacks it into its cache, so vLLM finds
its compiled state there instead of compiling.

vLLM decides itself whether a cache entry fits (its directory names hash the config, the
code and the compiler), so an artifact that does not match is simply not used: never a
wrong result. A corrupt one (its sha256 differs from the record) is not unpacked. Both
are logged, and the stage's own fresh artifact replaces them. An artifact larger than
``max_bytes`` is not stored. ``scope`` keeps tenants apart: compiled code from one
namespace is never run by another's workers.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from hydraserve.logs import get_logger
from hydraserve.store import ModelStore

log = get_logger("worker.artifacts")

# What under VLLM_CACHE_ROOT a stage's start writes and a later start can use.
CACHED_DIRS = ("torch_compile_cache", "modelinfos")
PREFIX = "artifacts"


class ArtifactRecord(BaseModel):
    """The store's record of one artifact (``<key>.json`` beside ``<key>.tar``)."""

    key: str
    sha256: str
    size: int
    files: int
    engine: str
    created_at: float


def artifact_key(engine: str, device: str, stage_args: list[str], pp: int, rank: int) -> str:
    """Which starts may share an artifact: same engine, device, stage and engine flags."""
    factors = {"engine": engine, "device": device, "pp": pp, "rank": rank, "args": stage_args}
    return hashlib.sha256(json.dumps(factors, sort_keys=True).encode()).hexdigest()[:20]


def _keys(scope: str, key: str) -> tuple[str, str]:
    base = f"{PREFIX}/{scope}/{key}"
    return f"{base}.json", f"{base}.tar"


def cache_files(cache_root: Path) -> dict[str, float]:
    """Every file of the cached directories, relative to the cache root, with its mtime."""
    found: dict[str, float] = {}
    for name in CACHED_DIRS:
        top = cache_root / name
        if top.is_dir():
            for path in top.rglob("*"):
                if path.is_file():
                    found[str(path.relative_to(cache_root))] = path.stat().st_mtime
    return found


def cache_entry(path: str) -> str:
    """The cache entry a file belongs to: vLLM's compile caches are a directory per config
    hash (``torch_compile_cache/<hash>``, ``torch_compile_cache/torch_aot_compile/<hash>``),
    model inspections a file each."""
    parts = path.split("/")
    if parts[0] == "torch_compile_cache" and len(parts) > 3 and parts[1] == "torch_aot_compile":
        return "/".join(parts[:3])
    if parts[0] == "torch_compile_cache" and len(parts) > 2:
        return "/".join(parts[:2])
    return path


def _safe_member(member: tarfile.TarInfo) -> bool:
    """A regular file under one of the cached directories, with a plain relative path."""
    parts = member.name.split("/")
    return (
        member.isfile()
        and not member.name.startswith("/")
        and parts[0] in CACHED_DIRS
        and all(part not in ("", ".", "..") for part in parts)
    )


@dataclass
class Restored:
    """What a start got from the store."""

    state: str  # "restored", "missing", "corrupt", "refused", "error"
    files: int = 0
    size: int = 0


def restore(store: ModelStore, scope: str, key: str, cache_root: Path) -> Restored:
    """Unpack the stored artifact for ``key`` into ``cache_root`` (files that exist stay)."""
    record_key, tar_key = _keys(scope, key)
    try:
        if not store.backend.exists(record_key):
            log.info("artifacts.missing", key=key, scope=scope)
            return Restored("missing")
        record = ArtifactRecord.model_validate_json(store.backend.read(record_key))
        data = store.backend.read(tar_key)
    except Exception as exc:  # the store is not required to start: compile instead
        log.warning("artifacts.error", key=key, scope=scope, error=str(exc))
        return Restored("error")
    digest = hashlib.sha256(data).hexdigest()
    if digest != record.sha256 or len(data) != record.size:
        log.warning(
            "artifacts.corrupt",
            key=key,
            scope=scope,
            expected_sha256=record.sha256,
            sha256=digest,
            reason="the artifact's bytes differ from its record: ignored, the engine "
            "compiles and this start's artifact replaces it",
        )
        return Restored("corrupt")
    cache_root.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as archive:
            members = archive.getmembers()
            hostile = [m.name for m in members if not _safe_member(m)]
            if hostile:
                log.warning(
                    "artifacts.refused",
                    key=key,
                    scope=scope,
                    members=hostile[:5],
                    reason="entries outside the compile cache, links or special files: the "
                    "artifact is ignored whole",
                )
                return Restored("refused")
            fresh = [m for m in members if not (cache_root / m.name).exists()]
            # The "data" filter re-checks every path and drops modes it would not trust.
            archive.extractall(cache_root, members=fresh, filter="data")
            count = len(fresh)
    except (tarfile.TarError, OSError) as exc:  # a record over bytes that are no archive
        log.warning("artifacts.refused", key=key, scope=scope, error=str(exc))
        return Restored("refused")
    log.info("artifacts.restored", key=key, scope=scope, files=count, bytes=len(data))
    return Restored("restored", files=count, size=len(data))


def publish(
    store: ModelStore,
    scope: str,
    key: str,
    engine: str,
    cache_root: Path,
    before: dict[str, float],
    restored: Restored,
    max_bytes: int,
) -> ArtifactRecord | None:
    """After the engine is ready: if this start wrote to its cache, store what it wrote
    (with the rest of the directories it wrote into) as the artifact for ``key``."""
    after = cache_files(cache_root)
    written = sorted(p for p, mtime in after.items() if before.get(p) != mtime)
    if not written:
        if restored.state == "restored":
            log.info("artifacts.used", key=key, scope=scope)
        return None
    if restored.state == "restored":
        log.warning(
            "artifacts.refreshed",
            key=key,
            scope=scope,
            written=len(written),
            reason="the engine wrote new cache entries after the restore: vLLM could not "
            "use part of the artifact (another config, code or compiler, or an entry it "
            "fails to load); this start's entries replace it",
        )
    # Whole cache entries that this start wrote into: an entry is only usable complete.
    units = {cache_entry(p) for p in written}
    files = sorted(p for p in after if cache_entry(p) in units)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for path in files:
            archive.add(cache_root / path, arcname=path, recursive=False)
    data = buffer.getvalue()
    if len(data) > max_bytes:
        log.warning("artifacts.too_large", key=key, scope=scope, bytes=len(data), limit=max_bytes)
        return None
    record = ArtifactRecord(
        key=key,
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        files=len(files),
        engine=engine,
        created_at=time.time(),
    )
    record_key, tar_key = _keys(scope, key)
    store.backend.write(tar_key, data)
    store.backend.write(record_key, record.model_dump_json().encode())  # last: marks it whole
    log.info("artifacts.published", key=key, scope=scope, files=len(files), bytes=len(data))
    return record
