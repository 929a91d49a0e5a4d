"""The engine-side in-flight counter that draining waits on."""

from __future__ import annotations

import asyncio

import httpx
from starlette.types import Receive, Scope, Send

from hydraserve.worker.inflight import INFLIGHT_PATH, InFlightMiddleware


async def test_requests_are_counted_until_they_end_however_they_end() -> None:
    release = asyncio.Event()

    async def engine(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] == "/v1/fail":
            raise RuntimeError("engine error")
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = InFlightMiddleware(engine)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:

        async def in_flight() -> int:
            return int((await client.get(INFLIGHT_PATH)).json()["in_flight"])

        assert await in_flight() == 0
        running = [asyncio.create_task(client.post("/v1/completions")) for _ in range(3)]
        for _ in range(100):
            if await in_flight() == 3:
                break
            await asyncio.sleep(0.01)
        assert await in_flight() == 3
        assert (await client.post("/v1/fail")).status_code == 500
        assert await in_flight() == 3  # a failed request is not counted after it ended
        running[0].cancel()  # a client that goes away
        await asyncio.gather(running[0], return_exceptions=True)
        release.set()
        await asyncio.gather(*running[1:])
        assert await in_flight() == 0
