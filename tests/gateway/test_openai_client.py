"""The official ``openai`` client against the gateway and a fast fake engine."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import openai
import pytest

from hydraserve.gateway.auth import Authenticator, KeyEntry, hash_key
from tests.support.fakes import FakeClusterBackend, make_model, ready_instance

from .conftest import Harness, RunningEngine, fast_settings

StartEngine = Callable[..., Awaitable[RunningEngine]]
StartGateway = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def gw(start_engine: StartEngine, start_gateway: StartGateway) -> Harness:
    engine = await start_engine()
    backend = FakeClusterBackend(
        [make_model("m")], endpoint_for=lambda m, i: engine.url, cold_start_seconds=0.1
    )
    return await start_gateway(backend, fast_settings(queue_size_per_model=2))


def sync_client(gw: Harness) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)


def async_client(gw: Harness) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)


async def test_sync_client_completion_chat_and_models(gw: Harness) -> None:
    def run() -> None:
        client = sync_client(gw)
        completion = client.completions.create(model="m", prompt="hello", max_tokens=3)
        assert completion.choices[0].text == "tok0 tok1 tok2 "
        assert completion.usage is not None and completion.usage.completion_tokens == 3
        chat = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, n=2
        )
        assert [c.message.content for c in chat.choices] == ["tok0 tok1 "] * 2
        assert [m.id for m in client.models.list()] == ["default/m"]  # namespace/name

    await asyncio.to_thread(run)


async def test_async_client_streaming(gw: Harness) -> None:
    client = async_client(gw)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    text = ""
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == "tok0 tok1 tok2 tok3 "
    completion_stream = await client.completions.create(
        model="m", prompt="x", max_tokens=2, stream=True
    )
    assert "".join([c.choices[0].text async for c in completion_stream]) == "tok0 tok1 "


async def test_client_exceptions_match_the_status_codes(gw: Harness) -> None:
    client = async_client(gw)
    with pytest.raises(openai.NotFoundError) as not_found:
        await client.completions.create(model="nope", prompt="x")
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await client.completions.create(model="m", prompt="x", temperature=9)
    assert bad.value.param == "temperature"


async def test_engine_failure_mid_stream_raises_in_the_client(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine(break_after_tokens=1)
    backend = FakeClusterBackend([make_model("m")], endpoint_for=lambda m, i: engine.url)
    gw = await start_gateway(backend)
    stream = await async_client(gw).completions.create(
        model="m", prompt="x", max_tokens=5, stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="failed"):
        async for chunk in stream:
            received.append(chunk.choices[0].text)
    assert received == ["tok0 "]


async def test_queue_full_is_a_rate_limit_error_in_the_client(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(
        FakeClusterBackend([make_model("m")]), fast_settings(queue_size_per_model=1)
    )
    client = async_client(gw)
    waiting = asyncio.create_task(client.completions.create(model="m", prompt="x"))
    while gw.gateway.dispatcher.queue_length("default/m") == 0:
        await asyncio.sleep(0.01)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.completions.create(model="m", prompt="x")
    assert limited.value.response.headers["retry-after"]
    waiting.cancel()
    await asyncio.gather(waiting, return_exceptions=True)


# --- two tenants, one model name (decision 0502) ---------------------------------------

KEY_A = "hs-tenant-a-key-0123456789"
KEY_B = "hs-tenant-b-key-0123456789"


@dataclass
class Tenants:
    gw: Harness
    engines: dict[str, RunningEngine]  # namespace -> the engine of its "llama"


@pytest.fixture
async def tenants(start_engine: StartEngine, start_gateway: StartGateway) -> Tenants:
    """Namespaces team-a and team-b each have a model "llama", on its own engine; each key
    is scoped to one namespace."""
    engines = {ns: await start_engine(name=f"engine-{ns}") for ns in ("team-a", "team-b")}
    backend = FakeClusterBackend(qualified_keys=True)
    for ns, engine in engines.items():
        instance = ready_instance(f"{ns}/llama", f"llama-{ns}-0", engine.url)
        backend.add_model(make_model("llama", namespace=ns), instances=[instance])
    authenticator = Authenticator(
        [
            KeyEntry(name="a", sha256=hash_key(KEY_A), namespaces=["team-a"]),
            KeyEntry(name="b", sha256=hash_key(KEY_B), namespaces=["team-b"]),
        ]
    )
    gw = await start_gateway(backend, fast_settings(auth_enabled=True), authenticator=authenticator)
    return Tenants(gw, engines)


def tenant_client(gw: Harness, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)


async def test_each_tenant_sees_and_reaches_only_its_own_model(tenants: Tenants) -> None:
    engines = tenants.engines
    for key, mine, theirs in (
        (KEY_A, "team-a", "team-b"),
        (KEY_B, "team-b", "team-a"),
    ):
        client = tenant_client(tenants.gw, key)
        listed = [m.id async for m in client.models.list()]
        assert listed == [f"{mine}/llama"]
        assert (await client.models.retrieve("llama")).id == f"{mine}/llama"

        # The bare name is unique in the key's scope: it reaches the tenant's own engine.
        before = engines[theirs].engine.stats.requests
        completion = await client.completions.create(model="llama", prompt="x", max_tokens=2)
        assert completion.system_fingerprint == f"engine-{mine}"
        chat = await client.chat.completions.create(
            model=f"{mine}/llama", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        assert chat.system_fingerprint == f"engine-{mine}"
        # The engine is sent the name it serves, whichever form the client used.
        assert [b["model"] for b in engines[mine].engine.stats.bodies[-2:]] == ["llama"] * 2
        assert engines[theirs].engine.stats.requests == before

        # The other tenant's model does not exist for this key, by any name.
        with pytest.raises(openai.NotFoundError) as hidden:
            await client.completions.create(model=f"{theirs}/llama", prompt="x")
        assert hidden.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model=f"{theirs}/llama", messages=[{"role": "user", "content": "hi"}]
            )
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(f"{theirs}/llama")
        assert engines[theirs].engine.stats.requests == before


async def test_a_key_over_both_namespaces_must_name_the_model_fully(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend(qualified_keys=True)
    for ns in ("team-a", "team-b"):
        instance = ready_instance(f"{ns}/llama", f"llama-{ns}-0", engine.url)
        backend.add_model(make_model("llama", namespace=ns), instances=[instance])
    gw = await start_gateway(backend)
    client = async_client(gw)
    with pytest.raises(openai.BadRequestError) as ambiguous:
        await client.completions.create(model="llama", prompt="x")
    assert ambiguous.value.code == "ambiguous_model" and ambiguous.value.param == "model"
    assert "team-a/llama" in ambiguous.value.message
    assert "team-b/llama" in ambiguous.value.message
    with pytest.raises(openai.BadRequestError):
        await client.models.retrieve("llama")
    done = await client.completions.create(model="team-b/llama", prompt="x", max_tokens=1)
    assert done.choices[0].text == "tok0 "
    assert sorted([m.id async for m in client.models.list()]) == ["team-a/llama", "team-b/llama"]
