"""The status a request is counted with: a stream that delivered ``[DONE]`` is a 200
whatever the client does with the socket afterwards; 499 only for a client that left
before the end (``hydraserve_gateway_requests_total`` and the rejection counter)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import openai

from tests.support.fakes import FakeClusterBackend, make_model, ready_instance

from .conftest import Harness, RunningEngine, eventually, fast_settings

StartEngine = Callable[..., Awaitable[RunningEngine]]
StartGateway = Callable[..., Awaitable[Harness]]
STREAM = {"model": "m", "prompt": "hello", "max_tokens": 6, "stream": True}


async def warm(start_engine: StartEngine, start_gateway: StartGateway) -> tuple[Any, Harness]:
    engine = await start_engine()
    # The engine ends its response a moment after [DONE], as a real server's last chunk
    # can trail it: a client that stops at [DONE] closes before the response ends.
    engine.engine.behaviour.done_linger = 0.3
    backend = FakeClusterBackend([make_model("m")])
    backend.set_instances("m", [ready_instance("m", "m-0", engine.url)])
    return engine, await start_gateway(backend, fast_settings())


def counted(gw: Harness) -> dict[str, float]:
    """Requests counted so far, by status."""
    by_status: dict[str, float] = {}
    for family in gw.gateway.metrics.registry.collect():
        if family.name != "hydraserve_gateway_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                status = sample.labels["status"]
                by_status[status] = by_status.get(status, 0) + sample.value
    return by_status


async def wait_counted(gw: Harness, total: int) -> dict[str, float]:
    await eventually(lambda: sum(counted(gw).values()) >= total, what=f"{total} counted")
    return counted(gw)


async def test_streams_read_to_the_end_with_the_openai_client_are_200(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    _, gw = await warm(start_engine, start_gateway)
    client = openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
    for _ in range(6):
        stream = await client.completions.create(
            model="m", prompt="hello", max_tokens=6, stream=True
        )
        texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
        assert "".join(texts).split() == [f"tok{i}" for i in range(6)]
    await client.close()
    assert await wait_counted(gw, 6) == {"200": 6}


async def test_httpx_reading_the_stream_then_closing_is_200(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    _, gw = await warm(start_engine, start_gateway)
    for _ in range(3):
        async with gw.client.stream("POST", "/v1/completions", json=STREAM) as response:
            body = await response.aread()
        assert body.rstrip().endswith(b"data: [DONE]")
    assert await wait_counted(gw, 3) == {"200": 3}


async def close_after_done(url: str) -> bytes:
    """A raw HTTP/1.1 client that hangs up the moment it has read ``[DONE]`` (as curl-like
    tools and some SDKs do), before the chunked body's terminator."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    body = json.dumps(STREAM).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    seen = b""
    while b"data: [DONE]" not in seen:
        chunk = await reader.read(65536)
        assert chunk, seen
        seen += chunk
    writer.transport.abort()  # no FIN handshake, no reading the last chunk
    return seen


async def test_a_client_closing_right_after_done_is_200(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    _, gw = await warm(start_engine, start_gateway)
    for _ in range(5):
        seen = await close_after_done(gw.url)
        assert seen.startswith(b"HTTP/1.1 200")
    assert await wait_counted(gw, 5) == {"200": 5}
    value = await gw.metric(
        "hydraserve_gateway_rejections_total", model="default/m", reason="client_disconnected"
    )
    assert value == 0


async def test_a_client_leaving_mid_stream_is_499(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine, gw = await warm(start_engine, start_gateway)
    engine.engine.behaviour.token_delay = 0.05
    body = {**STREAM, "max_tokens": 1000}
    async with gw.client.stream("POST", "/v1/completions", json=body) as response:
        async for _ in response.aiter_bytes():
            break  # one chunk, then hang up
    assert await wait_counted(gw, 1) == {"499": 1}
