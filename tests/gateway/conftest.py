"""Fixtures: a gateway on a real socket in front of fake engines and a fake backend."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from hydraserve.gateway import GatewaySettings, create_app
from hydraserve.gateway.app import Gateway
from hydraserve.gateway.auth import Authenticator
from tests.support.fakes import FakeClusterBackend, FakeEngine, serve_asgi


def fast_settings(**overrides: Any) -> GatewaySettings:
    """Settings with short intervals so tests run quickly (no timing is asserted)."""
    values: dict[str, Any] = {
        "auth_enabled": False,
        "stream_keepalive_seconds": 0.05,
        "watch_poll_seconds": 0.05,
        "autoscale_interval_seconds": 0.05,
        "observe_interval_seconds": 0.05,
        "queue_timeout_seconds": 10.0,
        "unreachable_cooldown_seconds": 5.0,
    }
    values.update(overrides)
    return GatewaySettings(**values)


@dataclass
class Harness:
    url: str
    backend: FakeClusterBackend
    gateway: Gateway
    client: httpx.AsyncClient

    async def metric(self, name: str, **labels: str) -> float:
        value = self.gateway.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value


@dataclass
class RunningEngine:
    engine: FakeEngine
    url: str


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = ""
) -> None:
    """Wait until ``condition`` holds (polling); fail the test after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {what or condition}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as exit_stack:
        yield exit_stack


@pytest.fixture
def start_engine(stack: AsyncExitStack) -> Callable[..., Awaitable[RunningEngine]]:
    async def start(**behaviour: Any) -> RunningEngine:
        engine = FakeEngine()
        for key, value in behaviour.items():
            setattr(engine.behaviour, key, value)
        url = await stack.enter_async_context(serve_asgi(engine))
        return RunningEngine(engine, url)

    return start


@pytest.fixture
def start_gateway(stack: AsyncExitStack) -> Callable[..., Awaitable[Harness]]:
    async def start(
        backend: FakeClusterBackend,
        settings: GatewaySettings | None = None,
        authenticator: Authenticator | None = None,
    ) -> Harness:
        app = create_app(backend, settings or fast_settings(), authenticator=authenticator)
        url = await stack.enter_async_context(serve_asgi(app))
        client = await stack.enter_async_context(
            httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(30.0))
        )
        return Harness(url, backend, app.state.gateway, client)

    return start
