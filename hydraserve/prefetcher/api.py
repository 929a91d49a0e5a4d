"""HTTP API of the node prefetcher (one per GPU node; a DaemonSet in Kubernetes)."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path as FsPath
from typing import Any

from fastapi import FastAPI, HTTPException, Path
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings
from starlette.responses import Response

from hydraserve.api.models import REVISION_PATTERN, SOURCE_URI_PATTERN
from hydraserve.prefetcher.fetcher import FetchOptions
from hydraserve.prefetcher.node import NodeStatus, OverCapacity, Prefetcher, PreloadRequest
from hydraserve.prefetcher.shm import SAFE_NAME_PATTERN, FetchStatus
from hydraserve.settings import CommonSettings, component_config
from hydraserve.store import ModelNotFound, StoreError


class PrefetcherSettings(BaseSettings):
    model_config = component_config("prefetcher")
    common: CommonSettings = Field(default_factory=CommonSettings)
    node_name: str = Field(default_factory=socket.gethostname)
    cache_capacity_bytes: int = Field(default=16 << 30, ge=0)
    concurrency: int = Field(default=8, ge=1, le=256, description="Parallel ranged GETs.")
    chunk_bytes: int = Field(default=16 << 20, ge=64 << 10, description="Bytes per GET.")
    max_retries: int = Field(default=5, ge=0)


class EvictRequest(BaseModel):
    uri: str = Field(pattern=SOURCE_URI_PATTERN, max_length=1024)
    revision: str = Field(default="main", pattern=REVISION_PATTERN, max_length=128)


class KVAreaRequest(BaseModel):
    """Who may write an instance's KV area: its workers' user and group."""

    uid: int | None = Field(default=None, ge=1, description="Never root.")
    gid: int | None = Field(default=None, ge=0)


def build_prefetcher(settings: PrefetcherSettings) -> Prefetcher:
    return Prefetcher(
        node=settings.node_name,
        shm_dir=FsPath(settings.common.shm_dir),
        capacity_bytes=settings.cache_capacity_bytes,
        s3=settings.common.s3,
        options=FetchOptions(
            concurrency=settings.concurrency,
            chunk_bytes=settings.chunk_bytes,
            max_retries=settings.max_retries,
        ),
    )


def create_app(prefetcher: Prefetcher) -> FastAPI:
    app = FastAPI(title="HydraServe node prefetcher", version="v1")
    registry = CollectorRegistry()
    used = Gauge(
        "hydraserve_prefetcher_cache_bytes", "Bytes held in shared memory", registry=registry
    )
    capacity = Gauge(
        "hydraserve_prefetcher_cache_capacity_bytes", "Cache capacity", registry=registry
    )
    moved = Gauge(
        "hydraserve_prefetcher_store_bytes", "Bytes read from the store (total)", registry=registry
    )
    models = Gauge("hydraserve_prefetcher_models", "Models held", ["complete"], registry=registry)

    @app.post("/v1/preload", status_code=202)
    async def preload(request: PreloadRequest) -> FetchStatus:
        try:
            return await asyncio.to_thread(prefetcher.preload, request)
        except ModelNotFound as exc:
            raise HTTPException(404, str(exc)) from exc
        except OverCapacity as exc:
            raise HTTPException(507, str(exc)) from exc
        except (KeyError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from exc
        except StoreError as exc:
            raise HTTPException(502, str(exc)) from exc

    @app.put("/v1/kv-areas/{area}")
    async def open_kv_area(
        request: KVAreaRequest,
        area: str = Path(pattern=SAFE_NAME_PATTERN, max_length=128),
    ) -> dict[str, str]:
        path = await asyncio.to_thread(prefetcher.open_kv_area, area, request.uid, request.gid)
        return {"area": area, "path": str(path)}

    @app.delete("/v1/kv-areas/{area}")
    async def close_kv_area(
        area: str = Path(pattern=SAFE_NAME_PATTERN, max_length=128),
    ) -> dict[str, bool]:
        return {"deleted": await asyncio.to_thread(prefetcher.close_kv_area, area)}

    @app.get("/v1/status")
    async def status() -> NodeStatus:
        return await asyncio.to_thread(prefetcher.status)

    @app.post("/v1/evict")
    async def evict(request: EvictRequest) -> dict[str, Any]:
        return {"evicted": await asyncio.to_thread(prefetcher.evict, request.uri, request.revision)}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "node": prefetcher.node}

    @app.get("/metrics")
    async def metrics() -> Response:
        snapshot = await asyncio.to_thread(prefetcher.status)
        used.set(snapshot.used_bytes)
        capacity.set(snapshot.capacity_bytes)
        moved.set(snapshot.bytes_from_store)
        models.labels(complete="true").set(sum(m.complete for m in snapshot.models))
        models.labels(complete="false").set(sum(not m.complete for m in snapshot.models))
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4")

    return app
