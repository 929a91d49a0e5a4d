"""A model whose worker always crashes, on Kubernetes: the shared lifecycle policy's
exponential backoff between replacements, then Failed with the reason and no more pods
(the same schedule tests/backends/test_lifecycle.py checks for local processes)."""

from __future__ import annotations

import itertools
from typing import Any

from hydraserve.control.instances import backoff_delay
from hydraserve.operator.naming import PRELOADED_AT_ANNOTATION
from tests.operator.conftest import NAMESPACE, Cluster, OperatorRunner, eventually
from tests.support.waits import operator_passes

FAILURES = 3


async def _new_pod(cluster: Cluster, seen: set[str]) -> dict[str, Any] | None:
    pods = [p for p in await cluster.pods() if p["metadata"]["name"] not in seen]
    return pods[0] if pods else None


async def _failed(cluster: Cluster) -> dict[str, Any] | None:
    model = await cluster.model("llama")
    conditions = ((model or {}).get("status") or {}).get("conditions") or []
    ready = next((c for c in conditions if c["type"] == "Ready"), None)
    return ready if ready and ready["reason"] == "InstancesFailing" else None


async def test_a_worker_that_always_crashes_backs_off_then_fails_with_few_pods(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cluster.add_gpu_node("gpu-a", gpus=2)
    await cluster.add_prefetcher("gpu-a")
    app = await operators.start(
        failure_backoff_seconds=0.5,
        failure_backoff_max_seconds=1.5,
        max_consecutive_failures=FAILURES,
    )
    await cluster.apply_model("llama", replicas=1)

    seen: set[str] = set()
    created: list[float] = []
    for _ in range(FAILURES):  # the test plays a kubelet whose container always exits
        pod = await eventually(lambda: _new_pod(cluster, seen), what="a new worker pod")
        seen.add(pod["metadata"]["name"])
        created.append(float(pod["metadata"]["annotations"][PRELOADED_AT_ANNOTATION]))
        await cluster.fail_pod(pod["metadata"]["name"], "worker exited with code 1")

    ready = await eventually(lambda: _failed(cluster), what="Ready=False InstancesFailing")
    assert f"{FAILURES} instances failed in a row" in ready["message"]
    assert "worker exited with code 1" in ready["message"]
    events = {e.get("reason") for e in await cluster.events()}
    assert "InstancesFailing" in events

    # Each replacement waited at least the backoff after the failures before it ...
    policy = app.settings.lifecycle_policy()
    for k, (before, after) in enumerate(itertools.pairwise(created), start=1):
        assert after - before >= backoff_delay(k, policy), (k, after - before)
    # ... and after giving up, passes create nothing more.
    await operator_passes(app.reconciler, NAMESPACE, "llama", more=3)
    names = {p["metadata"]["name"] for p in await cluster.pods()}
    assert names <= seen, names - seen
