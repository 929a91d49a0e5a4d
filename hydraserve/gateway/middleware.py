"""The outermost layer: request ids and the request size limit (plain ASGI, no buffering)."""

from __future__ import annotations

import itertools
import os
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from hydraserve.gateway import errors

_CLIENT_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")
# Unique across gateway replicas and restarts (random prefix), cheap per request (counter).
_ID_PREFIX = os.urandom(6).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):010x}"


class RequestTooLarge(errors.GatewayError):
    def __init__(self, limit: int) -> None:
        error = errors.request_too_large(limit)
        super().__init__(error.status, error.message, type=error.type, code=error.code)


class FrontDoorMiddleware:
    """Gives every request an id (the client's ``X-Request-Id`` if it is sane), echoes it
    on the response, and refuses bodies over ``max_bytes`` with 413 — from the declared
    ``Content-Length`` before reading, or while reading a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = None
        declared = None
        for name, value in scope["headers"]:
            if name == b"x-request-id" and _CLIENT_REQUEST_ID.match(value):
                request_id = value.decode()
            elif name == b"content-length":
                declared = value
        if request_id is None:
            request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        id_header = (b"x-request-id", request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name == b"x-request-id" for name, _ in headers):
                    headers.append(id_header)
                message = {**message, "headers": headers}
            await send(message)

        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            error = errors.request_too_large(self.max_bytes)
            if not declared.isdigit():
                error = errors.GatewayError(
                    400, "Invalid Content-Length header.", type=errors.INVALID_REQUEST,
                    code="invalid_content_length",
                )  # fmt: skip
            await errors.error_response(error)(scope, receive, send_with_id)
            return

        received = 0
        limit = self.max_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLarge(limit)
            return message

        await self.app(scope, limited_receive, send_with_id)
