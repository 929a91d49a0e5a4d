"""Requests moving mid-stream over real sockets: a pipeline drains, its replacement takes
over, and every client sees one stream equal to an unmoved run (FakeLMEngine is greedy)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

import httpx

from hydraserve.backends.base import InstanceOrigin, InstancePhase, InstanceView
from hydraserve.gateway.migration import LOAD_KEY, SAVE_KEY
from hydraserve.gateway.sse import data_payloads
from tests.support.fakes import (
    FakeClusterBackend,
    FakeLMBehaviour,
    FakeLMEngine,
    make_model,
    ready_instance,
    serve_asgi,
)

from .conftest import Harness, eventually, fast_settings

StartGateway = Callable[..., Awaitable[Harness]]


class Cluster:
    """A pipeline on engine A; ``switch()`` makes a standalone on engine B take over."""

    def __init__(self, a: FakeLMEngine, a_url: str, b: FakeLMEngine, b_url: str) -> None:
        self.a, self.b = a, b
        self.pipeline = replace(ready_instance("m", "m-pipe", a_url), pp=2, node="n1")
        self.standalone = replace(
            ready_instance("m", "m-solo", b_url), origin=InstanceOrigin.CONSOLIDATION, node="n1"
        )
        self.backend = FakeClusterBackend([make_model("m")])
        self.backend.set_instances("m", [self.pipeline])

    def switch(self) -> None:
        draining = replace(self.pipeline, phase=InstancePhase.DRAINING)
        self.backend.set_instances("m", [draining, self.standalone])


async def cluster(stack: AsyncExitStack, token_delay: float = 0.01, **kv: Any) -> Cluster:
    a = FakeLMEngine(FakeLMBehaviour(token_delay=token_delay))
    b = FakeLMEngine(FakeLMBehaviour(token_delay=token_delay))
    a_url = await stack.enter_async_context(serve_asgi(a))
    b_url = await stack.enter_async_context(serve_asgi(b))
    made = Cluster(a, a_url, b, b_url)
    if kv:
        made.pipeline = replace(made.pipeline, kv_transfer=True)
        made.standalone = replace(made.standalone, kv_transfer=True)
        made.backend.add_model(make_model("m"), instances=[made.pipeline])
        view = made.backend.get_model("m")
        assert view is not None
        made.backend._views["m"] = replace(view, kv_bytes_per_token=kv["kv_bytes_per_token"])
    return made


def expected(path: str, body: dict[str, Any]) -> tuple[str, list[int]]:
    answer = FakeLMEngine().answer(path, body)
    return "".join(answer.texts), answer.tokens


def stream_text(events: list[dict[str, Any]], chat: bool) -> str:
    parts = []
    for event in events:
        for choice in event.get("choices") or []:
            parts.append((choice["delta"].get("content") or "") if chat else choice["text"])
    return "".join(parts)


def carries_text(choice: dict[str, Any]) -> bool:
    return bool(choice.get("text") or (choice.get("delta") or {}).get("content"))


async def stream_request(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    after_tokens: int | None = None,
    on_tokens: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Stream a request; call ``on_tokens`` once ``after_tokens`` token events arrived."""
    events: list[dict[str, Any]] = []
    tokens = 0
    raw = b""
    async with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for chunk in response.aiter_bytes():
            raw += chunk
            *whole, raw = raw.split(b"\n\n")
            for event in whole:
                for payload in data_payloads(event + b"\n\n"):
                    if payload == b"[DONE]":
                        continue
                    data = json.loads(payload)
                    assert "error" not in data, data
                    events.append(data)
                    tokens += sum(1 for c in data.get("choices") or [] if carries_text(c))
                    if on_tokens is not None and tokens >= (after_tokens or 0):
                        on_tokens()
                        on_tokens = None
    return events


COMPLETION = {"model": "m", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 30}


async def test_a_stream_moves_to_the_new_instance_without_a_gap_in_its_tokens(
    stack: AsyncExitStack, start_gateway: StartGateway
) -> None:
    c = await cluster(stack)
    gw = await start_gateway(c.backend, fast_settings())
    events = await stream_request(gw.client, "/v1/completions", COMPLETION, 10, c.switch)
    text, tokens = expected("/v1/completions", COMPLETION)
    assert stream_text(events, chat=False) == text
    assert {e["id"] for e in events} == {events[0]["id"]}
    assert all(e["choices"][0]["token_ids"] is None for e in events)  # not asked for
    # The old engine saw the client leave; the new one continued from token ids.
    await eventually(lambda: c.a.stats.disconnected == 1, what="old stream aborted")
    (cont,) = c.b.stats.bodies
    prompt = FakeLMEngine().tokenize(COMPLETION["prompt"])
    assert cont["prompt"][: len(prompt)] == prompt
    moved = len(cont["prompt"]) - len(prompt)
    assert 10 <= moved < 40 and cont["prompt"][len(prompt) :] == tokens[:moved]
    assert cont["max_tokens"] == 40 - moved
    assert await gw.metric("hydraserve_gateway_migrations_total", model="default/m",
                           method="recompute") == 1  # fmt: skip
    assert (
        await gw.metric("hydraserve_gateway_migration_stall_seconds_count", model="default/m") == 1
    )


async def test_concurrent_requests_of_every_kind_all_complete_through_the_switch(
    stack: AsyncExitStack, start_gateway: StartGateway
) -> None:
    c = await cluster(stack, token_delay=0.02)
    gw = await start_gateway(c.backend, fast_settings())
    bodies = [
        ("/v1/completions", {**COMPLETION, "prompt": f"story {i}", "return_token_ids": True,
                             "stream_options": {"include_usage": True}})
        for i in range(4)
    ] + [("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": f"q{i}"}]})
         for i in range(2)]  # fmt: skip
    streams = [asyncio.create_task(stream_request(gw.client, path, body)) for path, body in bodies]
    whole = [
        asyncio.create_task(gw.client.post("/v1/completions", json={**COMPLETION, "prompt": p}))
        for p in ("plain one", "plain two")
    ] + [asyncio.create_task(gw.client.post("/v1/chat/completions", json=CHAT))]
    # Switch while every request runs on the pipeline.
    await eventually(lambda: c.a.stats.active == len(bodies) + 3, what="all on the pipeline")
    await eventually(lambda: c.a.stats.tokens_sent >= 30, what="tokens flowing")
    c.switch()
    results = await asyncio.gather(*streams)
    for (path, body), events in zip(bodies, results, strict=True):
        text, tokens = expected(path, body)
        chat = path.endswith("chat/completions")
        assert stream_text(events, chat) == text, body
        if body.get("return_token_ids"):
            ids = [t for e in events for ch in e["choices"] for t in ch.get("token_ids") or []]
            assert ids == tokens
            (usage,) = [e["usage"] for e in events if e.get("usage")]
            assert usage["completion_tokens"] == len(tokens)
    for task, (path, body) in zip(
        whole,
        [("/v1/completions", {**COMPLETION, "prompt": p}) for p in ("plain one", "plain two")]
        + [("/v1/chat/completions", CHAT)],
        strict=True,
    ):
        response = await task
        assert response.status_code == 200, response.text
        answer = response.json()
        text, tokens = expected(path, body)
        choice = answer["choices"][0]
        got = choice["message"]["content"] if "message" in choice else choice["text"]
        assert got == text
        assert answer["usage"]["completion_tokens"] == len(tokens)
        assert choice.get("token_ids") is None and choice.get("prompt_token_ids") is None
        assert answer.get("prompt_token_ids") is None
    moved = await gw.metric(
        "hydraserve_gateway_migrations_total", model="default/m", method="recompute"
    )
    assert moved == len(bodies) + 3
    # New requests go to the new instance only.
    before = c.a.stats.requests
    response = await gw.client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 200
    assert c.a.stats.requests == before


async def test_requests_that_cannot_move_exactly_finish_on_the_draining_instance(
    stack: AsyncExitStack, start_gateway: StartGateway
) -> None:
    c = await cluster(stack)
    gw = await start_gateway(c.backend, fast_settings())
    body = {**COMPLETION, "stop": ["never"]}
    events = await stream_request(gw.client, "/v1/completions", body, 5, c.switch)
    assert stream_text(events, chat=False) == expected("/v1/completions", body)[0]
    assert c.b.stats.requests == 0 and c.a.stats.completed == 1
    assert c.a.stats.bodies[0] == {**body, "stream": True}  # relayed as is
    assert await gw.metric("hydraserve_gateway_migrations_skipped_total", model="default/m",
                           reason="stop") == 1  # fmt: skip


async def test_with_kv_capable_engines_the_cost_model_may_move_the_kv(
    stack: AsyncExitStack, start_gateway: StartGateway
) -> None:
    c = await cluster(stack, kv_bytes_per_token=1024)
    gw = await start_gateway(c.backend, fast_settings(migration_method="kv"))
    events = await stream_request(gw.client, "/v1/completions", COMPLETION, 8, c.switch)
    assert stream_text(events, chat=False) == expected("/v1/completions", COMPLETION)[0]
    first = c.a.stats.bodies[0]
    save_key = first["kv_transfer_params"][SAVE_KEY]
    (cont,) = c.b.stats.bodies
    assert cont["kv_transfer_params"][LOAD_KEY] == save_key
    assert (
        await gw.metric("hydraserve_gateway_migrations_total", model="default/m", method="kv") == 1
    )


async def test_kv_transfer_needs_both_engines_on_one_node(
    stack: AsyncExitStack, start_gateway: StartGateway
) -> None:
    c = await cluster(stack, kv_bytes_per_token=1024)
    c.standalone = replace(c.standalone, node="elsewhere")
    gw = await start_gateway(c.backend, fast_settings(migration_method="kv"))
    events = await stream_request(gw.client, "/v1/completions", COMPLETION, 8, c.switch)
    assert stream_text(events, chat=False) == expected("/v1/completions", COMPLETION)[0]
    (cont,) = c.b.stats.bodies
    assert LOAD_KEY not in (cont.get("kv_transfer_params") or {})
    assert await gw.metric("hydraserve_gateway_migrations_total", model="default/m",
                           method="recompute") == 1  # fmt: skip


async def test_a_request_still_waiting_for_its_first_token_starts_over_elsewhere(
    stack: AsyncExitStack, start_gateway: StartGateway
) -> None:
    c = await cluster(stack)
    c.a.behaviour.first_token_delay = 30.0  # stuck in "prefill" on the pipeline
    gw = await start_gateway(c.backend, fast_settings())
    task = asyncio.create_task(stream_request(gw.client, "/v1/completions", COMPLETION))
    await eventually(lambda: c.a.stats.active == 1, what="request on the pipeline")
    c.switch()
    events = await asyncio.wait_for(task, 10)
    assert stream_text(events, chat=False) == expected("/v1/completions", COMPLETION)[0]
    (again,) = c.b.stats.bodies
    assert again["prompt"] == COMPLETION["prompt"]


async def test_a_stream_that_breaks_resumes_on_another_ready_instance(
    stack: AsyncExitStack, start_gateway: StartGateway
) -> None:
    c = await cluster(stack)
    c.a.behaviour.break_after_tokens = 7  # the pipeline's engine dies mid-stream
    c.backend.set_instances("m", [c.pipeline, c.standalone])
    gw = await start_gateway(c.backend, fast_settings())
    events = await stream_request(gw.client, "/v1/completions", COMPLETION)
    assert stream_text(events, chat=False) == expected("/v1/completions", COMPLETION)[0]
    assert c.a.stats.requests == 1 and len(c.b.stats.bodies) == 1
    assert c.b.stats.bodies[0]["prompt"] != COMPLETION["prompt"]  # continued, not restarted


async def test_a_broken_stream_with_nowhere_to_go_ends_with_an_error_event(
    stack: AsyncExitStack, start_gateway: StartGateway
) -> None:
    c = await cluster(stack)
    c.a.behaviour.break_after_tokens = 3
    gw = await start_gateway(c.backend, fast_settings())
    body = {**COMPLETION, "stream": True}
    async with gw.client.stream("POST", "/v1/completions", json=body) as response:
        raw = await response.aread()
    payloads = data_payloads(raw)
    assert payloads[-1] == b"[DONE]"
    error = json.loads(payloads[-2])
    assert error["error"]["type"] and "nowhere to move" in error["error"]["message"]


def test_views_of_a_draining_instance_keep_no_route() -> None:
    # The router never picks a draining instance, whatever its load.
    from hydraserve.gateway.router import choose_instance

    draining = InstanceView("a", "m", 2, InstancePhase.DRAINING, endpoint="http://a")
    ready = InstanceView("b", "m", 1, InstancePhase.READY, endpoint="http://b")
    assert choose_instance([draining, ready], {"b": 100}, 256) == ready
    assert choose_instance([draining], {}, 256) is None
