"""The operator's client of the node prefetchers: preload, and a shared view of their status.

Every reconcile pass needs what each node's prefetcher holds and fetches (readiness: are
an instance's stage bytes verified; consolidation: is the whole model there; planning:
host caches and in-flight fetches). Their ``GET /v1/status`` answers are cached for
``max_age`` seconds and shared by all models, so a busy operator asks each node at most
once per interval whatever the number of models.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import httpx
from pydantic import ValidationError

from hydraserve.logs import get_logger
from hydraserve.prefetcher.node import NodeStatus, PreloadRequest

log = get_logger("operator.prefetchers")


class Prefetchers:
    def __init__(
        self,
        *,
        preload_timeout_s: float,
        probe_timeout_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._http = httpx.AsyncClient(timeout=preload_timeout_s)
        self._probe_timeout_s = probe_timeout_s
        self._clock = clock
        self._statuses: dict[str, tuple[float, NodeStatus | None]] = {}  # url -> (at, status)
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        await self._http.aclose()

    async def statuses(
        self, urls: Mapping[str, str], max_age: float = 1.0
    ) -> dict[str, NodeStatus | None]:
        """node -> its prefetcher's status (None: it did not answer), at most ``max_age``
        seconds old; stale ones are asked again, concurrently."""
        async with self._lock:
            now = self._clock()
            stale = [
                url
                for url in set(urls.values())
                if url not in self._statuses or now - self._statuses[url][0] > max_age
            ]
            answers = await asyncio.gather(*(self._status(url) for url in stale))
            for url, answer in zip(stale, answers, strict=True):
                self._statuses[url] = (now, answer)
            return {node: self._statuses[url][1] for node, url in urls.items()}

    def forget(self) -> None:
        """Drop cached answers (after a preload, the next read asks again)."""
        self._statuses.clear()

    async def _status(self, url: str) -> NodeStatus | None:
        try:
            resp = await self._http.get(f"{url}/v1/status", timeout=self._probe_timeout_s)
            resp.raise_for_status()
            return NodeStatus.model_validate(resp.json())
        except (httpx.HTTPError, ValueError, ValidationError) as exc:
            log.warning("prefetcher.status_failed", prefetcher=url, error=str(exc) or repr(exc))
            return None

    async def preload(self, url: str, request: PreloadRequest) -> str | None:
        """Ask a node's prefetcher to fetch; None when accepted, else why not."""
        try:
            resp = await self._http.post(f"{url}/v1/preload", json=request.model_dump(mode="json"))
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            return str(exc) or type(exc).__name__
        self._statuses.pop(url, None)
        return None

    async def open_kv_area(self, url: str, area: str, uid: int | None) -> str | None:
        """Have a node's prefetcher create an instance's KV area, writable by ``uid``
        alone; None when done, else why not."""
        try:
            resp = await self._http.put(f"{url}/v1/kv-areas/{area}", json={"uid": uid, "gid": uid})
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            return str(exc) or type(exc).__name__
        return None

    async def close_kv_area(self, url: str, area: str) -> str | None:
        try:
            resp = await self._http.delete(f"{url}/v1/kv-areas/{area}")
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            return str(exc) or type(exc).__name__
        return None
