"""The embedded platform end to end: `hydraserve up`, real vLLM, the official client."""

from __future__ import annotations

import json
import os
import time

import httpx
import pytest
from openai import NotFoundError, OpenAI

from tests.e2e.conftest import VLLM_CACHE, Platform
from tests.support.stock_vllm import stock_greedy

pytestmark = pytest.mark.slow

PROMPTS = ["Hello, world! The cluster", "Once upon a time", "def add(a, b):"]
STEPS = 16


def client(platform: Platform) -> OpenAI:
    return OpenAI(base_url=platform.url, api_key="unused", max_retries=0, timeout=300)


def test_models_lists_the_demo_model(platform: Platform) -> None:
    # Canonical ids: namespace/name (decision 0502); requests may still say "demo".
    names = {m.id for m in client(platform).models.list()}
    assert {"default/demo", "default/missing", "default/corrupt"} <= names


def test_cold_then_warm_completion_and_cold_start_metrics(platform: Platform) -> None:
    openai = client(platform)
    started = time.time()
    cold = openai.completions.create(model="demo", prompt="Hello", max_tokens=8)
    cold_seconds = time.time() - started
    assert cold.choices[0].text and cold.usage and cold.usage.completion_tokens == 8
    started = time.time()
    warm = openai.completions.create(model="demo", prompt="Hello", max_tokens=8)
    warm_seconds = time.time() - started
    assert warm.choices[0].text == cold.choices[0].text or warm.choices[0].text
    assert warm_seconds < cold_seconds / 3, (cold_seconds, warm_seconds)
    # The cold start is recorded once its record is whole (the backend has read the
    # worker's timeline), which may be a poll after the first answer: wait for it.
    metrics = ""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = httpx.get(platform.url.removesuffix("/v1") + "/metrics").text
        if "hydraserve_cold_start_prediction_error_seconds_count" in metrics:
            break
        time.sleep(0.5)
    for stage in ("imports", "engine_init", "weight_load"):
        assert f'stage="{stage}"' in metrics, stage
    # The planner's prediction beside the measured cold start: in the log and as metrics.
    assert (
        'hydraserve_cold_start_prediction_error_seconds_count{model="default/demo"} 1.0' in metrics
    )
    measured = [
        line for line in platform.log_tail(400).splitlines() if "coldstart.measured" in line
    ]
    assert measured, platform.log_tail()
    event = json.loads(measured[0])  # the platform logs JSON lines
    assert event["predicted_ready_s"] > 0 and event["measured_ready_s"] > 0


def test_streaming_chat(platform: Platform) -> None:
    stream = client(platform).chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Say hi"}],
        max_tokens=12,
        stream=True,
    )
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) >= 2
    assert "".join(pieces)


def test_greedy_output_equals_stock_vllm(platform: Platform) -> None:
    # Stock vLLM on the same checkpoint, eager and bf16 as the platform's engine runs.
    env = {**os.environ, "VLLM_CACHE_ROOT": str(VLLM_CACHE)}
    reference = stock_greedy(platform.checkpoint, PROMPTS, STEPS, eager=True, env=env)
    openai = client(platform)
    for ref in reference:
        out = openai.completions.create(
            model="demo",
            prompt=ref.prompt,
            max_tokens=STEPS,
            temperature=0,
            logprobs=1,
            extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
        )
        logprobs = out.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
        tokens = [int(t.split(":")[1]) for t in logprobs.tokens]
        assert tokens == ref.token_ids, (ref.prompt, ref.margins)
        # The same engine on the same bytes: the chosen tokens' logprobs agree as well.
        drift = max(
            abs(mine - theirs)
            for mine, theirs in zip(logprobs.token_logprobs, ref.logprobs, strict=True)
        )
        assert drift < 0.01, (ref.prompt, drift)


def test_unknown_model_is_a_404_in_openai_shape(platform: Platform) -> None:
    with pytest.raises(NotFoundError) as info:
        client(platform).completions.create(model="no-such-model", prompt="x", max_tokens=1)
    body = info.value.body
    assert isinstance(body, dict) and "no-such-model" in body["message"]


def test_malformed_body_names_the_field(platform: Platform) -> None:
    resp = httpx.post(
        f"{platform.url}/completions", json={"model": "demo", "prompt": "x", "max_tokens": "many"}
    )
    assert resp.status_code in (400, 422)
    error = resp.json()["error"]
    assert "max_tokens" in (error.get("param") or "") + error["message"]
    resp = httpx.post(
        f"{platform.url}/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert resp.status_code == 400 and "error" in resp.json()


def test_model_missing_from_the_store_fails_fast_and_clearly(platform: Platform) -> None:
    started = time.time()
    resp = httpx.post(
        f"{platform.url}/completions",
        json={"model": "missing", "prompt": "x", "max_tokens": 1},
        timeout=60,
    )
    assert time.time() - started < 30
    assert resp.status_code >= 400
    message = resp.json()["error"]["message"]
    assert "hydraserve model push" in message and "nonexistent" in message


def test_a_worker_never_serves_a_corrupted_model(platform: Platform) -> None:
    started = time.time()
    resp = httpx.post(
        f"{platform.url}/completions",
        json={"model": "corrupt", "prompt": "x", "max_tokens": 1},
        timeout=300,
    )
    assert resp.status_code == 503, resp.text
    message = resp.json()["error"]["message"]
    assert "model.layers.2.self_attn.o_proj.weight" in message and "sha256" in message
    assert time.time() - started < 240
