"""Consolidation end to end: a pp = 2 cold start, then a standalone engine takes over while
requests stream; every request succeeds and equals a pp = 1 run token for token.

One platform (real vLLM: a compiled pp = 2 pipeline, then an eager pp = 1 standalone started
from shared memory, both with HydraServe's KV connector). Clients keep streaming
(completions, chat) and non-streaming requests through the switch; the cost model's
constants make long contexts move by KV transfer and short ones by recompute. Afterwards
the requests that ran across the switch are sent again to the standalone (pp = 1, not
moved) as the reference.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Platform, start_platform, stop_platform

pytestmark = pytest.mark.slow

STREAM_TOKENS = 160


@dataclass
class Outcome:
    path: str
    body: dict[str, Any]
    status: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    max_gap_s: float = 0.0
    error: str | None = None
    started: float = 0.0
    ended: float = 0.0


def run_request(url: str, path: str, body: dict[str, Any]) -> Outcome:
    """One request; streams are read event by event (gaps between token events timed)."""
    outcome = Outcome(path, body, started=time.time())
    chat = path.endswith("chat/completions")
    try:
        with httpx.Client(timeout=300) as client:
            if not body.get("stream"):
                response = client.post(url + path, json=body)
                outcome.status = response.status_code
                answer = response.json()
                choice = answer["choices"][0]
                outcome.text = choice["message"]["content"] if chat else choice["text"]
                outcome.token_ids = choice.get("token_ids") or []
                return outcome
            with client.stream("POST", url + path, json=body) as response:
                outcome.status = response.status_code
                last = None
                for line in response.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        outcome.error = json.dumps(data)
                        continue
                    for choice in data.get("choices") or []:
                        piece = (choice["delta"].get("content") or "") if chat else choice["text"]
                        ids = choice.get("token_ids") or []
                        if piece or ids:
                            now = time.perf_counter()
                            if last is not None:
                                outcome.max_gap_s = max(outcome.max_gap_s, now - last)
                            last = now
                        outcome.text += piece
                        outcome.token_ids += ids
    except Exception as exc:
        outcome.error = repr(exc)
    finally:
        outcome.ended = time.time()
    return outcome


def model_status(platform: Platform) -> dict[str, Any]:
    card = httpx.get(f"{platform.url}/models/demo", timeout=10).json()
    status: dict[str, Any] = card["hydraserve"]
    return status


def metric(platform: Platform, name: str) -> float:
    text = httpx.get(platform.url.removesuffix("/v1") + "/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


def request_mix(worker: int, serial: int) -> tuple[str, dict[str, Any]]:
    prompt = f"Request {worker}.{serial}: Once upon a time the cluster"
    common = {"model": "demo", "temperature": 0, "ignore_eos": True}
    if worker == 0:
        return "/v1/chat/completions", {
            **common,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": STREAM_TOKENS,
            "stream": True,
            "return_token_ids": True,
        }
    if worker == 1:
        return "/v1/completions", {**common, "prompt": prompt, "max_tokens": STREAM_TOKENS // 2,
                                   "return_token_ids": True}  # fmt: skip
    return "/v1/completions", {
        **common,
        "prompt": prompt,
        "max_tokens": STREAM_TOKENS,
        "stream": True,
        "return_token_ids": worker % 2 == 0,
    }


@pytest.fixture(scope="module")
def pipeline_platform(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cores = os.cpu_count() or 1
    binds = [str(i % cores) for i in range(2)]
    platform = start_platform(
        tmp_path_factory.mktemp("consolidation"),
        env={
            "HYDRASERVE_LOCAL_PIPELINE_SIZE": "2",
            "HYDRASERVE_LOCAL_ENFORCE_EAGER": "false",  # pp > 1 must be compiled on CPU
            "HYDRASERVE_LOCAL_CPU_BINDS": json.dumps(binds),
            "HYDRASERVE_LOCAL_CONSOLIDATION": "true",
            "HYDRASERVE_LOCAL_KV_TRANSFER": "true",
            # Moving a context costs 1 ms per token to recompute, or 10 ms + its KV bytes
            # to transfer: contexts past ~10 tokens move their KV, shorter ones recompute
            # (with the warm runtime the standalone is ready a few seconds after the
            # pipeline: the contexts in flight then hold ~30-50 tokens).
            "HYDRASERVE_GATEWAY_MIGRATION_PREFILL_TOKENS_PER_S": "1000",
            "HYDRASERVE_GATEWAY_MIGRATION_LEARN_PREFILL": "false",
            "HYDRASERVE_GATEWAY_MIGRATION_KV_FIXED_SECONDS": "0.01",
        },
    )
    yield platform
    stop_platform(platform)


def test_requests_stream_through_consolidation_and_equal_a_pp1_run(
    pipeline_platform: Platform,
) -> None:
    platform = pipeline_platform
    url = platform.url.removesuffix("/v1")
    # The first request is the cold start: a pp = 2 pipeline (pipeline_size forces it). The
    # clients start while it runs, so requests are in flight whenever the standalone takes
    # over: forked from the warm runtime it is ready seconds after the pipeline (decision
    # 0600), often before a request that waited for the cold start has finished.
    started: list[Outcome] = []
    cold = threading.Thread(
        target=lambda: started.append(run_request(url, *request_mix(3, 0))), daemon=True
    )
    cold.start()
    phases: list[str] = []
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(worker: int) -> None:
        serial = 1
        while not stop.is_set():
            outcome = run_request(url, *request_mix(worker, serial))
            with lock:
                outcomes.append(outcome)
            serial += 1
            # Leave the standalone engine some CPU to start on (2 cores, 2 busy stages).
            stop.wait(0.5)

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(4)]
    for thread in threads:
        thread.start()
    deadline = time.time() + 400
    switched_at = 0.0
    while time.time() < deadline:
        phase = model_status(platform)["phase"]
        if not phases or phases[-1] != phase:
            phases.append(phase)
        if metric(platform, 'hydraserve_consolidations_total{model="default/demo",outcome="done"}'):
            switched_at = time.time()
            break
        time.sleep(0.5)
    stop.set()
    for thread in [cold, *threads]:
        thread.join(300)
    (first,) = started
    assert first.status == 200 and first.error is None, first
    phases.append(model_status(platform)["phase"])
    assert "Consolidating" in phases and phases[-1] == "Serving", (phases, platform.log_tail())
    assert phases.index("Consolidating") < len(phases) - 1

    moved = metric(platform, "hydraserve_gateway_migrations_total")
    by_kv = metric(
        platform, 'hydraserve_gateway_migrations_total{method="kv",model="default/demo"}'
    )
    assert moved >= 1, "no request was in flight at the switch"
    assert by_kv >= 1, "no request moved its KV cache"
    failed = [o for o in outcomes if o.status != 200 or o.error]
    assert not failed, failed[:3]
    assert len(outcomes) >= 4

    # Only the standalone serves now: pp = 1, started by the consolidation; it loaded KV.
    log = platform.log.read_text()
    assert '"origin": "consolidation"' in log and "consolidation.done" in log
    stage_logs = "".join(p.read_text() for p in platform.state_dir.glob("instances/*/stage*.log"))
    assert "kv.saved" in stage_logs and "kv.loaded" in stage_logs
    # The reference: the requests that ran across the switch (and a few others) again,
    # on the pp = 1 engine, not moved.
    across = [o for o in outcomes if o.ended >= switched_at - 30]
    for outcome in [first, *outcomes[:2], *across]:
        body = dict(outcome.body)
        body["return_token_ids"] = True
        reference = run_request(url, outcome.path, body)
        assert reference.status == 200 and reference.error is None
        assert outcome.text == reference.text, (outcome.path, outcome.body)
        if outcome.body.get("return_token_ids"):
            assert outcome.token_ids == reference.token_ids
    assert metric(platform, "hydraserve_gateway_migrations_total") == moved  # none since
    assert (
        metric(platform, 'hydraserve_gateway_migration_stall_seconds_count{model="default/demo"}')
        >= 1
    )


def test_status_and_metrics_report_the_consolidation(pipeline_platform: Platform) -> None:
    text = httpx.get(pipeline_platform.url.removesuffix("/v1") + "/metrics", timeout=10).text
    for stage in ("fetch", "promote", "drain"):
        sample = (
            f'hydraserve_consolidation_stage_seconds_count{{model="default/demo",stage="{stage}"}}'
        )
        assert f"{sample} 1.0" in text
    assert 'hydraserve_consolidation_seconds_count{model="default/demo"} 1.0' in text
    # The standalone engine is not counted as a cold start.
    assert 'hydraserve_cold_starts_total{model="default/demo"} 1.0' in text
    assert model_status(pipeline_platform)["ready_instances"] == 1
