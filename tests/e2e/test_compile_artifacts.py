"""Compile artifacts travel with the model (decision 0601): a compiled engine started on a
second node, with an empty compile cache, takes what the first node's start compiled from
the store; a corrupted artifact is ignored with a log line. Same greedy tokens every time.

Each node is a platform (``hydraserve up``) with its own state and its own compile cache;
the model store is shared, as it is across a cluster's nodes. Real vLLM, compiled mode
(vLLM's default on CPU: Dynamo once, then Inductor), the tiny demo model; each start's
timeline says what it got from the store. How much an artifact saves is measured in
benchmarks/cold_start (first start against later starts).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from hydraserve.store import ModelRef, ModelStore
from hydraserve.worker.timeline import read_timeline
from tests.e2e.conftest import start_platform, stop_platform

pytestmark = pytest.mark.slow

MODEL = """\
apiVersion: hydraserve.io/v1alpha1
kind: ServerlessModel
metadata: {{name: shared}}
spec:
  source: {{uri: "file://{uri}"}}
  resources: {{gpuMemoryGiB: 1}}
"""


def events_of(log: Path) -> list[dict[str, Any]]:
    found = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
    return found


def start_on_a_fresh_node(node: Path, store_uri: str) -> tuple[list[str], dict[str, Any], set[str]]:
    """A cold start of the shared model on a node whose compile cache is empty: its greedy
    tokens, its timeline's artifacts stage and the artifact events its worker logged
    once serving (waited for: publishing happens after the engine is ready)."""
    models = node / "models.yaml"
    node.mkdir(parents=True)
    models.write_text(MODEL.format(uri=store_uri))
    platform = start_platform(
        node / "state",
        env={
            # Compiled with Inductor: its generated code is what the cache holds (the eager
            # backend compiles nothing, so vLLM writes no cache entries for it).
            "HYDRASERVE_LOCAL_ENFORCE_EAGER": "false",
            "HYDRASERVE_LOCAL_VLLM_CACHE_ROOT": str(node / "compile-cache"),
        },
        args=["--models-file", str(models)],
        bad_models=False,
        timeout=300,
    )
    try:
        client = OpenAI(base_url=platform.url, api_key="unused", timeout=600)
        done = client.completions.create(
            model="shared", prompt="Once upon a time", max_tokens=8, temperature=0, logprobs=1
        )
        logprobs = done.choices[0].logprobs
        assert logprobs is not None and logprobs.tokens is not None
        tokens = list(logprobs.tokens)
        (instance,) = [
            d for d in (platform.state_dir / "instances").iterdir() if "shared" in d.name
        ]
        final = {"artifacts.used", "artifacts.published", "artifacts.publish_failed"}
        deadline = time.monotonic() + 120
        seen: set[str] = set()
        while time.monotonic() < deadline and not seen & final:
            seen = {e["event"] for e in events_of(instance / "stage0.log")}
            time.sleep(0.2)
        stage = next(
            e for e in read_timeline(instance / "timeline.jsonl") if e["stage"] == "artifacts"
        )
        return tokens, stage, {s for s in seen if s.startswith("artifacts.")}
    finally:
        stop_platform(platform)


def test_a_second_node_starts_from_the_first_nodes_compile_artifacts(
    tmp_path: Path, demo_checkpoint: Path
) -> None:
    store = ModelStore(ModelRef(str(tmp_path / "store" / "shared")))
    store.push(demo_checkpoint)

    tokens_a, stage_a, events_a = start_on_a_fresh_node(tmp_path / "node-a", store.ref.uri)
    assert stage_a["state"] == "missing"
    assert events_a == {"artifacts.missing", "artifacts.published"}

    tokens_b, stage_b, events_b = start_on_a_fresh_node(tmp_path / "node-b", store.ref.uri)
    assert stage_b["state"] == "restored" and stage_b["files"] > 0
    # "used": vLLM loaded everything; "refreshed": it wrote entries too (vLLM 0.32 on CPU
    # cannot load its own AOT entries in a later process, decision 0601), which replace it.
    assert "artifacts.restored" in events_b
    assert events_b & {"artifacts.used", "artifacts.refreshed"}
    assert tokens_b == tokens_a

    # A corrupted artifact: ignored with a log line, the engine compiles, same tokens,
    # and the start's own artifact replaces it.
    (tar,) = (tmp_path / "store" / "shared").rglob("artifacts/*/*.tar")
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tar.write_bytes(bytes(raw))
    tokens_c, stage_c, events_c = start_on_a_fresh_node(tmp_path / "node-c", store.ref.uri)
    assert stage_c["state"] == "corrupt"
    assert events_c == {"artifacts.corrupt", "artifacts.published"}
    assert tokens_c == tokens_a
