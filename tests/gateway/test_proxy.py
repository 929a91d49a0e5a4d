"""Forwarding over real sockets: cold starts, streaming, failures, disconnects, routing."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from tests.support.fakes import FakeClusterBackend, make_model, ready_instance

from .conftest import Harness, RunningEngine, eventually, fast_settings

StartEngine = Callable[..., Awaitable[RunningEngine]]
StartGateway = Callable[..., Awaitable[Harness]]

COMPLETION = {"model": "m", "prompt": "hello", "max_tokens": 4}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


def events(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


def data_events(raw: bytes) -> list[Any]:
    """The JSON (or [DONE]) of each data event; comments are skipped."""
    out: list[Any] = []
    for event in events(raw):
        if event.startswith(b"data: "):
            payload = event[len(b"data: ") :]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


async def warm_gateway(
    start_engine: StartEngine, start_gateway: StartGateway, **settings: Any
) -> tuple[RunningEngine, Harness]:
    engine = await start_engine()
    backend = FakeClusterBackend([make_model("m")])
    backend.set_instances("m", [ready_instance("m", "m-0", engine.url)])
    harness = await start_gateway(backend, fast_settings(**settings))
    return engine, harness


async def test_completion_is_forwarded_with_the_original_body(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine, gw = await warm_gateway(start_engine, start_gateway)
    body = {**COMPLETION, "top_k": 5, "guided_choice": ["a", "b"]}  # engine extensions
    response = await gw.client.post(
        "/v1/completions", json=body, headers={"Authorization": "Bearer secret"}
    )
    assert response.status_code == 200
    answer = response.json()
    assert answer["choices"][0]["text"] == "tok0 tok1 tok2 tok3 "
    assert answer["usage"]["completion_tokens"] == 4
    assert engine.engine.stats.bodies[-1] == body
    forwarded = engine.engine.stats.headers[-1]
    assert "authorization" not in forwarded  # the client's key never reaches the engine
    assert forwarded["x-request-id"] == response.headers["x-request-id"]
    assert response.headers["x-hydraserve-instance"] == "m-0"


async def test_chat_stream_is_relayed_event_by_event(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    _, gw = await warm_gateway(start_engine, start_gateway)
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with gw.client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = await response.aread()
    parsed = data_events(raw)
    assert parsed[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in parsed[:-1]
                   if e["choices"])  # fmt: skip
    assert text == "tok0 tok1 tok2 "
    assert parsed[-2]["usage"]["completion_tokens"] == 3
    assert await gw.metric("hydraserve_gateway_time_to_first_token_seconds_count",
                           model="default/m") == 1  # fmt: skip


async def test_cold_model_is_started_and_the_request_waits_for_it(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend(
        [make_model("m")], endpoint_for=lambda model, i: engine.url, cold_start_seconds=0.2
    )
    gw = await start_gateway(backend)
    response = await gw.client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 200
    assert backend.scale_calls[0] == ("m", 1)
    assert await gw.metric("hydraserve_cold_starts_total", model="default/m") == 1
    for stage in ("fetch", "imports", "weight_load", "engine_init", "ready"):
        count = await gw.metric("hydraserve_cold_start_stage_seconds_count", model="default/m",
                                stage=stage)  # fmt: skip
        assert count == 1, stage


async def test_streaming_clients_get_keepalives_while_the_model_starts(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend(
        [make_model("m")], endpoint_for=lambda model, i: engine.url, cold_start_seconds=0.5
    )
    gw = await start_gateway(backend, fast_settings(stream_keepalive_seconds=0.05))
    async with gw.client.stream(
        "POST", "/v1/completions", json={**COMPLETION, "stream": True}
    ) as response:
        assert response.status_code == 200
        raw = await response.aread()
    assert raw.startswith(b": keep-alive\n\n")
    parsed = data_events(raw)
    assert parsed[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in parsed[:-1]) == "tok0 tok1 tok2 tok3 "


async def test_deadline_miss_is_503_with_retry_after(
    start_gateway: StartGateway,
) -> None:
    backend = FakeClusterBackend([make_model("m")])  # never starts anything
    gw = await start_gateway(
        backend, fast_settings(queue_timeout_seconds=0.2, timeout_retry_after_seconds=11)
    )
    response = await gw.client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "11"
    error = response.json()["error"]
    assert error["code"] == "cold_start_timeout" and error["type"]
    assert set(error) == {"message", "type", "param", "code"}
    assert gw.gateway.dispatcher.in_flight("default/m") == 0


async def test_deadline_miss_after_keepalives_is_an_error_event_then_done(
    start_gateway: StartGateway,
) -> None:
    backend = FakeClusterBackend([make_model("m")])
    gw = await start_gateway(
        backend, fast_settings(queue_timeout_seconds=0.3, stream_keepalive_seconds=0.05)
    )
    async with gw.client.stream(
        "POST", "/v1/completions", json={**COMPLETION, "stream": True}
    ) as response:
        assert response.status_code == 200
        raw = await response.aread()
    assert raw.startswith(b": keep-alive")
    parsed = data_events(raw)
    assert parsed[-1] == "[DONE]"
    assert parsed[0]["error"]["code"] == "cold_start_timeout"


async def test_full_queue_answers_429_and_every_accepted_request_completes(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend(
        [make_model("m")], endpoint_for=lambda model, i: engine.url, cold_start_seconds=0.3
    )
    gw = await start_gateway(backend, fast_settings(queue_size_per_model=5))
    responses = await asyncio.gather(
        *(gw.client.post("/v1/completions", json=COMPLETION) for _ in range(20))
    )
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) == 5
    assert statuses.count(429) == 15
    for r in responses:
        if r.status_code == 429:
            assert r.headers["retry-after"]
            assert r.json()["error"]["code"] == "queue_full"
        else:
            assert r.json()["choices"][0]["text"]
    assert engine.engine.stats.completed == 5


async def test_client_disconnect_while_queued_frees_the_slot(
    start_gateway: StartGateway,
) -> None:
    backend = FakeClusterBackend([make_model("m")])
    gw = await start_gateway(backend, fast_settings(queue_size_per_model=1))
    request = asyncio.create_task(gw.client.post("/v1/completions", json=COMPLETION))
    await eventually(lambda: gw.gateway.dispatcher.queue_length("default/m") == 1, what="queued")
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)
    await eventually(lambda: gw.gateway.dispatcher.in_flight("default/m") == 0, what="slot freed")
    assert gw.gateway.dispatcher.queue_length("default/m") == 0
    await eventually(
        lambda: gw.metric(
            "hydraserve_gateway_rejections_total", model="default/m", reason="client_disconnected"
        ),
        what="disconnect counted",
    )


async def test_client_disconnect_mid_stream_cancels_the_engine_request(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine, gw = await warm_gateway(start_engine, start_gateway)
    engine.engine.behaviour.token_delay = 0.05
    body = {**COMPLETION, "stream": True, "max_tokens": 1000}
    async with gw.client.stream("POST", "/v1/completions", json=body) as response:
        async for _ in response.aiter_bytes():
            break  # read one chunk, then hang up
    await eventually(lambda: engine.engine.stats.disconnected == 1, what="engine saw it")
    await eventually(lambda: gw.gateway.dispatcher.in_flight("default/m") == 0, what="lease freed")
    assert gw.gateway.dispatcher.outstanding("default/m") == {}


async def test_engine_crash_mid_stream_is_a_well_formed_error_event(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine, gw = await warm_gateway(start_engine, start_gateway)
    engine.engine.behaviour.break_after_tokens = 2
    async with gw.client.stream(
        "POST", "/v1/completions", json={**COMPLETION, "stream": True}
    ) as response:
        assert response.status_code == 200
        raw = await response.aread()
    parsed = data_events(raw)  # every event parses: the half event was held back
    assert [e["choices"][0]["text"] for e in parsed[:2]] == ["tok0 ", "tok1 "]
    assert parsed[2]["error"]["type"] == "upstream_error"
    assert parsed[3] == "[DONE]"
    assert len(parsed) == 4
    assert await gw.metric("hydraserve_gateway_rejections_total", model="default/m",
                           reason="upstream_stream_error") == 1  # fmt: skip


async def test_engine_errors_pass_through_in_the_openai_shape(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine, gw = await warm_gateway(start_engine, start_gateway)
    engine.engine.behaviour.fail_status = 400
    response = await gw.client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "injected failure by fake-engine"


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def test_a_replaced_instance_is_skipped_and_the_request_reaches_the_new_one(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend([make_model("m")])
    # The old instance's process is gone, but the backend still lists it as Ready.
    backend.set_instances("m", [ready_instance("m", "m-old", closed_port_url())])
    gw = await start_gateway(backend)
    request = asyncio.create_task(gw.client.post("/v1/completions", json=COMPLETION))
    await eventually(lambda: gw.gateway.dispatcher.queue_length("default/m") == 1, what="re-queued")
    backend.set_instances("m", [ready_instance("m", "m-new", engine.url)])
    response = await request
    assert response.status_code == 200
    assert response.headers["x-hydraserve-instance"] == "m-new"
    assert await gw.metric("hydraserve_gateway_upstream_retries_total", model="default/m") == 1


async def test_connect_errors_retry_on_another_ready_instance(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend([make_model("m")])
    backend.set_instances(
        "m",
        [ready_instance("m", "m-dead", closed_port_url()),
         ready_instance("m", "m-live", engine.url)],
    )  # fmt: skip
    gw = await start_gateway(backend)
    for _ in range(3):
        response = await gw.client.post("/v1/completions", json=COMPLETION)
        assert response.status_code == 200
        assert response.headers["x-hydraserve-instance"] == "m-live"
    assert await gw.metric("hydraserve_gateway_upstream_retries_total", model="default/m") == 1


async def test_no_reachable_instance_is_503_after_bounded_attempts(
    start_gateway: StartGateway,
) -> None:
    backend = FakeClusterBackend([make_model("m")])
    backend.set_instances("m", [ready_instance("m", "m-dead", closed_port_url())])
    gw = await start_gateway(
        backend, fast_settings(connect_attempts=2, unreachable_cooldown_seconds=0)
    )
    response = await gw.client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_reachable_instance"
    assert "retry-after" in response.headers


async def test_least_outstanding_routing_spreads_concurrent_requests(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engines = [await start_engine(first_token_delay=0.2) for _ in range(2)]
    backend = FakeClusterBackend([make_model("m")])
    backend.set_instances(
        "m", [ready_instance("m", f"m-{i}", e.url) for i, e in enumerate(engines)]
    )
    gw = await start_gateway(backend)
    responses = await asyncio.gather(
        *(gw.client.post("/v1/completions", json=COMPLETION) for _ in range(6))
    )
    assert all(r.status_code == 200 for r in responses)
    assert [e.engine.stats.requests for e in engines] == [3, 3]


async def test_engine_read_timeout_is_504(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine, gw = await warm_gateway(start_engine, start_gateway,
                                    upstream_read_timeout_seconds=0.1)  # fmt: skip
    engine.engine.behaviour.first_token_delay = 2.0
    response = await gw.client.post("/v1/completions", json=COMPLETION)
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "upstream_error"


async def test_many_concurrent_streams_each_get_exactly_one_whole_answer(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine(token_delay=0.001)
    backend = FakeClusterBackend(
        [make_model("m", target_concurrency=4)], endpoint_for=lambda m, i: engine.url,
        cold_start_seconds=0.1,
    )  # fmt: skip
    gw = await start_gateway(backend)

    async def one(i: int) -> list[Any]:
        body = {**COMPLETION, "stream": True, "max_tokens": 5, "prompt": str(i)}
        async with gw.client.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            return data_events(await response.aread())

    results = await asyncio.gather(*(one(i) for i in range(30)))
    for parsed in results:
        assert parsed[-1] == "[DONE]"
        assert len(parsed) == 5 + 2  # tokens, the finish event, [DONE]
    # Demand above targetConcurrency asked for more replicas (within maxReplicas).
    assert max(r for _, r in backend.scale_calls) > 1


async def test_request_id_from_the_client_is_kept(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine, gw = await warm_gateway(start_engine, start_gateway)
    response = await gw.client.post("/v1/completions", json=COMPLETION,
                                    headers={"X-Request-Id": "abc-123"})  # fmt: skip
    assert response.headers["x-request-id"] == "abc-123"
    assert engine.engine.stats.headers[-1]["x-request-id"] == "abc-123"
    hostile = await gw.client.post("/v1/completions", json=COMPLETION,
                                   headers={"X-Request-Id": "a b\tc"})  # fmt: skip
    assert hostile.headers["x-request-id"] != "a b\tc"


async def test_idle_model_scales_back_to_zero(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend(
        [make_model("m", keep_alive_seconds=0.2)], endpoint_for=lambda m, i: engine.url
    )
    gw = await start_gateway(backend)
    assert (await gw.client.post("/v1/completions", json=COMPLETION)).status_code == 200
    await eventually(lambda: ("m", 0) in backend.scale_calls, what="scaled to zero")
    view = backend.get_model("m")
    assert view is not None and view.instances == ()
    # ... and comes back on the next request.
    assert (await gw.client.post("/v1/completions", json=COMPLETION)).status_code == 200
    assert backend.scale_calls[-1] == ("m", 1)


async def test_httpx_client_sees_streamed_bytes_before_the_end(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    """Streams are relayed as they arrive, not buffered to the end."""
    engine, gw = await warm_gateway(start_engine, start_gateway)
    engine.engine.behaviour.token_delay = 0.2
    body = {**COMPLETION, "stream": True, "max_tokens": 50}
    async with gw.client.stream("POST", "/v1/completions", json=body) as response:
        first = await anext(response.aiter_bytes())
        assert b"tok0" in first
        assert engine.engine.stats.active == 1  # the engine is still generating
    assert isinstance(response, httpx.Response)
