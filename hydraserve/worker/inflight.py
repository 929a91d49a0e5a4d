"""An ASGI middleware for the engine's API server: how many requests it serves right now.

Loaded with vLLM's own ``--middleware`` option on stage 0 of every instance. The control
plane asks ``GET /hydraserve/inflight`` while an instance drains (consolidation): its
stage processes may be released once nothing is in flight. The count is exact whatever
ends a request (answer, error, client disconnect), because it is taken around the whole
ASGI call; vLLM's own load counter misses disconnects of streams, and its Prometheus
gauges are off with ``--disable-log-stats``.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

INFLIGHT_PATH = "/hydraserve/inflight"


class InFlightMiddleware:
    def __init__(self, app: ASGIApp, **_: Any) -> None:
        self.app = app
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path == INFLIGHT_PATH:
            body = json.dumps({"in_flight": self.in_flight}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if not path.startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
