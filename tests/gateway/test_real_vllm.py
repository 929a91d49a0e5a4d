"""The official ``openai`` client against the gateway in front of a real vLLM worker.

One worker (the tiny demo model, CPU) serves every test in this module; it takes 30-50 s
to start. The cluster backend is the in-memory fake, pointed at that worker, so a test can
still start "cold" (the instance appears only after the gateway asks to scale).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import openai
import pytest

from hydraserve.gateway import create_app
from tests.support.fakes import FakeClusterBackend, make_model, serve_asgi

from .conftest import Harness, eventually, fast_settings

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKER_START_TIMEOUT = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str, env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "hydraserve.cli.main", *args], env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def vllm_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of a running vLLM worker serving the tiny demo model as ``demo``."""
    work = tmp_path_factory.mktemp("vllm-worker")
    cache = REPO / ".cache" / "vllm"  # persistent across runs: compiled kernels are reused
    cache.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CACHE_ROOT": str(cache),
        "HYDRASERVE_SHM_DIR": f"/dev/shm/hydraserve-test-{os.getpid()}",
        "HYDRASERVE_LOG_JSON": "false",
    }
    cli("model", "make-demo", str(work / "src"), "--size", "tiny", env=env)
    cli("model", "push", str(work / "src"), str(work / "store" / "demo"), env=env)
    port = free_port()
    log_path = work / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "hydraserve.cli.main", "worker", "--uri",
             str(work / "store" / "demo"), "--name", "demo", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WORKER_START_TIMEOUT
        while True:
            if worker.poll() is not None:
                pytest.fail(f"worker exited ({worker.returncode}):\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"worker not ready in {WORKER_START_TIMEOUT} s:\n"
                            f"{log_path.read_text()[-4000:]}")  # fmt: skip
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(10)
        subprocess.run(["rm", "-rf", env["HYDRASERVE_SHM_DIR"]], check=False)


@pytest.fixture
async def gw(vllm_worker: str) -> AsyncIterator[Harness]:
    """A gateway whose cold model "starts" (after 0.5 s) as the running worker."""
    backend = FakeClusterBackend(
        [make_model("demo")], endpoint_for=lambda m, i: vllm_worker, cold_start_seconds=0.5
    )
    async with AsyncExitStack() as stack:
        app = create_app(backend, fast_settings(stream_keepalive_seconds=0.2))
        url = await stack.enter_async_context(serve_asgi(app))
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=url, timeout=60))
        yield Harness(url, backend, app.state.gateway, client)


def clients(url: str) -> tuple[openai.OpenAI, openai.AsyncOpenAI]:
    base = f"{url}/v1"
    return (
        openai.OpenAI(base_url=base, api_key="unused", max_retries=0),
        openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0),
    )


async def test_sync_client_cold_then_warm_equals_the_engine_directly(
    gw: Harness, vllm_worker: str
) -> None:
    via_gateway, _ = clients(gw.url)
    direct, _ = clients(vllm_worker)

    def run() -> None:
        models = [m.id for m in via_gateway.models.list()]
        assert models == ["default/demo"]  # canonical ids (decision 0502)
        for _ in range(2):  # the first is a cold start (queued until "ready"), then warm
            through = via_gateway.completions.create(
                model="demo", prompt="The quick brown fox", max_tokens=12, temperature=0
            )
            reference = direct.completions.create(
                model="demo", prompt="The quick brown fox", max_tokens=12, temperature=0
            )
            assert through.choices[0].text == reference.choices[0].text
            assert through.usage == reference.usage

    await asyncio.to_thread(run)
    assert gw.backend.scale_calls[0] == ("demo", 1)
    assert await gw.metric("hydraserve_cold_starts_total", model="default/demo") == 1


async def test_async_client_streaming_chat_matches_the_whole_answer(gw: Harness) -> None:
    _, client = clients(gw.url)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Tell me a story"}
    ]
    whole = await client.chat.completions.create(
        model="demo", messages=messages, max_tokens=16, temperature=0
    )
    stream = await client.chat.completions.create(
        model="demo", messages=messages, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    text, usage = "", None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage is not None:
            usage = chunk.usage
    assert text == whole.choices[0].message.content
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]
    assert await gw.metric("hydraserve_gateway_time_to_first_token_seconds_count",
                           model="default/demo") == 1  # fmt: skip


async def test_sampling_parameters_reach_the_engine(gw: Harness) -> None:
    _, client = clients(gw.url)
    several = await client.completions.create(
        model="demo", prompt="Once", max_tokens=8, temperature=1.0, n=3, seed=7
    )
    assert len(several.choices) == 3
    assert several.usage is not None and several.usage.completion_tokens <= 24
    capped = await client.completions.create(model="demo", prompt="Once", max_tokens=3)
    assert capped.usage is not None and capped.usage.completion_tokens == 3
    assert capped.choices[0].finish_reason == "length"
    stop = (await client.completions.create(
        model="demo", prompt="Once", max_tokens=20, temperature=0
    )).choices[0].text  # fmt: skip
    if len(stop) > 2:  # stop at a piece of the greedy continuation
        cut = await client.completions.create(
            model="demo", prompt="Once", max_tokens=20, temperature=0, stop=[stop[1:3]]
        )
        assert cut.choices[0].finish_reason == "stop"
        assert len(cut.choices[0].text) < len(stop)


async def test_engine_rejections_reach_the_client_in_the_openai_shape(gw: Harness) -> None:
    _, client = clients(gw.url)
    with pytest.raises(openai.BadRequestError) as rejected:
        await client.completions.create(model="demo", prompt="x", max_tokens=100_000)
    assert rejected.value.param == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="not-a-model", prompt="x")


async def test_disconnect_mid_stream_frees_the_lease_and_the_engine_keeps_serving(
    gw: Harness,
) -> None:
    body = {"model": "demo", "prompt": "Once upon a time", "max_tokens": 500, "stream": True,
            "temperature": 1.0, "ignore_eos": True}  # fmt: skip
    async with gw.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for _ in response.aiter_bytes():
            break
    await eventually(lambda: gw.gateway.dispatcher.in_flight("demo") == 0, what="freed")
    _, client = clients(gw.url)
    after = await client.completions.create(model="demo", prompt="x", max_tokens=2)
    assert after.usage is not None and after.usage.completion_tokens == 2
