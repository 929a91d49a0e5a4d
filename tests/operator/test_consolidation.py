"""The operator consolidates a pipelined instance on Kubernetes (decision 0402), against the
emulated API server, real HTTP prefetchers and a fake engine's in-flight endpoint.

pp = 2 Ready -> low-priority whole-model preload on the all-card node + standalone pod
there -> (test: standalone Ready, whole model verified) -> promote (pipeline Draining,
standalone Ready, model Consolidating) -> (test: nothing in flight) -> the pipeline's pods
and Service are deleted, the model is Serving. The test plays the kubelet, the node
prefetcher's fetch and the pipeline head's engine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from hydraserve.kube.client import path_of
from hydraserve.operator.handlers import OperatorApp
from hydraserve.operator.naming import model_claim_name
from tests.operator.conftest import (
    NAMESPACE,
    Cluster,
    FakeEngine,
    OperatorRunner,
    eventually,
    two_stage_planner,
)
from tests.support.waits import operator_passes

PLANNER = two_stage_planner(("gpu-a", "gpu-b"))
CONSOLIDATES = "hydraserve.io/consolidates"


async def start_operator(operators: OperatorRunner, engine: FakeEngine) -> OperatorApp:
    return await operators.start(
        plan_with=PLANNER,
        consolidation=True,
        consolidation_poll_seconds=0.2,
        # Longer than any wait here: what no pod event triggers (the fetch verified, the
        # drain) must be seen by the consolidation timer, not the resync.
        resync_seconds=60,
        drain_grace_seconds=0.3,
        # Stage 0's port: where the operator asks a draining pipeline's head what it serves.
        worker_port=engine.port,
    )


async def serving_pipeline(cluster: Cluster, operators: OperatorRunner, engine: FakeEngine) -> str:
    """A pp = 2 instance of "llama", both stages running and the head Ready; its name."""
    for node in ("gpu-a", "gpu-b"):
        await cluster.add_gpu_node(node)
        await cluster.add_prefetcher(node)
    await start_operator(operators, engine)
    await cluster.apply_model("llama", replicas=1)
    pods = await eventually(lambda: stage_pods(cluster, 2), what="both stage pods")
    for p in sorted(pods, key=lambda p: p["metadata"]["labels"]["hydraserve.io/stage"]):
        head = p["metadata"]["labels"]["hydraserve.io/stage"] == "0"
        # The head's pod IP is where its engine answers (the fake engine listens there).
        await cluster.run_pod(p, ip="127.0.0.1" if head else "10.1.0.8")
    return str(pods[0]["metadata"]["labels"]["hydraserve.io/instance"])


async def stage_pods(cluster: Cluster, count: int) -> list[dict[str, Any]] | None:
    pods = [p for p in await cluster.pods() if CONSOLIDATES not in p["metadata"]["labels"]]
    return pods if len(pods) == count else None


async def standalone_pods(cluster: Cluster) -> list[dict[str, Any]]:
    return [p for p in await cluster.pods() if CONSOLIDATES in p["metadata"]["labels"]]


async def one_standalone(cluster: Cluster) -> dict[str, Any] | None:
    pods = await standalone_pods(cluster)
    return pods[0] if len(pods) == 1 else None


def low_priority_calls(cluster: Cluster, node: str) -> list[dict[str, Any]]:
    return [c for c in cluster.prefetchers[node].calls if c.get("low_priority")]


async def instance_phases(cluster: Cluster) -> dict[str, tuple[str, str]]:
    model = await cluster.model("llama")
    instances = ((model or {}).get("status") or {}).get("instances") or []
    return {i["name"]: (i["phase"], i["origin"]) for i in instances}


async def model_phase(cluster: Cluster) -> str | None:
    model = await cluster.model("llama")
    return ((model or {}).get("status") or {}).get("phase")


async def promoted(cluster: Cluster, pipeline: str) -> dict[str, tuple[str, str]] | None:
    phases = await instance_phases(cluster)
    want = {
        pipeline: ("Draining", "cold_start"),
        f"{pipeline}-c": ("Ready", "consolidation"),
    }
    return phases if phases == want else None


async def released(cluster: Cluster, pipeline: str) -> bool:
    pods = await cluster.pods()
    services = [s["metadata"]["name"] for s in await cluster.services()]
    phases = await instance_phases(cluster)
    return (
        [p["metadata"]["name"] for p in pods] == [f"{pipeline}-c-0"]
        and services == [f"{pipeline}-c"]
        and phases == {f"{pipeline}-c": ("Ready", "consolidation")}
        and await model_phase(cluster) == "Serving"
    )


def annotations(svc: dict[str, Any] | None) -> dict[str, str]:
    return dict(((svc or {}).get("metadata") or {}).get("annotations") or {})


async def pipeline_service(cluster: Cluster, pipeline: str) -> dict[str, Any] | None:
    return await cluster.client.get(path_of("v1", "services", NAMESPACE, pipeline))


async def test_pipeline_is_consolidated_promoted_drained_and_released(
    cluster: Cluster, operators: OperatorRunner, engine: FakeEngine
) -> None:
    pipeline = await serving_pipeline(cluster, operators, engine)
    standalone = await eventually(lambda: one_standalone(cluster), what="the standalone pod")
    (app,) = [app for app, _, _ in operators.apps]

    # The whole model is asked of the all-card node's prefetcher, at low priority.
    calls = low_priority_calls(cluster, "gpu-a")
    assert calls and (calls[0]["pp"], calls[0]["rank"]) == (None, None)
    assert calls[0]["uri"] == cluster.store_uri
    assert not low_priority_calls(cluster, "gpu-b")
    cluster.prefetchers["gpu-a"].full[cluster.store_uri] = "fetching"

    # pp = 1, pinned to the all-card node, the same shm volume, outside the replica count.
    meta = standalone["metadata"]
    assert meta["name"] == f"{pipeline}-c-0"
    assert meta["labels"][CONSOLIDATES] == pipeline
    terms = standalone["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"]
    assert terms[0]["matchFields"][0]["values"] == ["gpu-a"]
    args = standalone["spec"]["containers"][0]["args"]
    assert "--pp=1" in args and "--rank=0" in args
    assert not [a for a in args if a.startswith("--master-addr")]
    volumes = {v["name"]: v for v in standalone["spec"]["volumes"]}
    claim = volumes["model"]["persistentVolumeClaim"]
    assert claim == {
        "claimName": model_claim_name(cluster.store_uri, "main", "gpu-a"),
        "readOnly": True,
    }
    model = await eventually(
        lambda: _status_if(cluster, lambda s: s.get("phase") == "Consolidating"),
        what="phase Consolidating",
    )
    assert model["status"]["replicas"] == 1 and model["status"]["readyReplicas"] == 1
    assert await instance_phases(cluster) == {
        pipeline: ("Ready", "cold_start"),
        f"{pipeline}-c": ("Starting", "consolidation"),
    }

    # Warm but the whole model not verified yet: no promotion.
    await cluster.run_pod(standalone, ip="10.1.0.9")
    await operator_passes(app.reconciler, NAMESPACE, "llama")
    assert (await instance_phases(cluster))[pipeline] == ("Ready", "cold_start")
    assert "hydraserve.io/draining-since" not in annotations(
        await pipeline_service(cluster, pipeline)
    )

    # Verified: promote. Something is still in flight on the pipeline: it drains.
    cluster.prefetchers["gpu-a"].full[cluster.store_uri] = "done"
    await eventually(lambda: promoted(cluster, pipeline), what="pipeline Draining")
    assert await model_phase(cluster) == "Consolidating"
    assert "hydraserve.io/draining-since" in annotations(await pipeline_service(cluster, pipeline))
    asked = engine.asked
    # The head's engine is asked while it drains (by the operator's own timer) ...
    await eventually(lambda: asyncio.sleep(0, engine.asked > asked), what="the head asked")
    # ... and while it is busy, no pass releases the pipeline.
    await operator_passes(app.reconciler, NAMESPACE, "llama")
    assert await stage_pods(cluster, 2) is not None

    # Idle: the pipeline's stage pods and Service go; the standalone serves alone.
    engine.in_flight = 0
    idle_at = time.time()
    await eventually(lambda: released(cluster, pipeline), what="the pipeline released")
    # The release's pass deletes first and writes status after.
    model = await eventually(
        lambda: _status_if(cluster, lambda s: bool(s.get("consolidations"))),
        what="the consolidation in the history",
    )
    assert model["status"]["replicas"] == 1 and model["status"]["readyReplicas"] == 1
    # The history the gateway's consolidation metrics read.
    (done,) = model["status"]["consolidations"]
    assert (done["pipeline"], done["standalone"], done["outcome"], done["reason"]) == (
        pipeline,
        f"{pipeline}-c",
        "done",
        "drained",
    )
    assert done["startedAt"] <= done["fetchedAt"] <= done["promotedAt"] <= done["releasedAt"]
    assert done["releasedAt"] >= idle_at  # released only once its engine was idle
    events = {e.get("reason") for e in await cluster.events()}
    assert {"ConsolidationStarted", "ConsolidationPromoted"} <= events
    # Nothing more happens: no second standalone for the standalone, no cold start.
    await operator_passes(app.reconciler, NAMESPACE, "llama")
    assert await released(cluster, pipeline)


async def _status_if(cluster: Cluster, check: Any) -> dict[str, Any] | None:
    model = await cluster.model("llama")
    return model if model and check(model.get("status") or {}) else None


async def test_operator_restarts_mid_consolidation_and_finishes_it_once(
    cluster: Cluster, operators: OperatorRunner, engine: FakeEngine
) -> None:
    pipeline = await serving_pipeline(cluster, operators, engine)
    standalone = await eventually(lambda: one_standalone(cluster), what="the standalone pod")
    (first,) = [app for app, _, _ in operators.apps]

    # Killed while the standalone starts: the next operator finds it (no second one).
    await operators.crash(first)
    second = await start_operator(operators, engine)
    await operator_passes(second.reconciler, NAMESPACE, "llama", kick=False)
    assert [p["metadata"]["name"] for p in await standalone_pods(cluster)] == [
        standalone["metadata"]["name"]
    ]
    services = [s["metadata"]["name"] for s in await cluster.services()]
    assert sorted(services) == sorted([pipeline, f"{pipeline}-c"])

    cluster.prefetchers["gpu-a"].full[cluster.store_uri] = "done"
    await cluster.run_pod(standalone, ip="10.1.0.9")
    await eventually(lambda: promoted(cluster, pipeline), what="pipeline Draining")

    # Killed while the pipeline drains: the record is on its Service, the next one releases.
    await operators.crash(second)
    engine.in_flight = 0
    await start_operator(operators, engine)
    await eventually(lambda: released(cluster, pipeline), what="the pipeline released")
    assert len(await standalone_pods(cluster)) == 1


async def test_failed_standalone_is_abandoned_and_the_pipeline_keeps_serving(
    cluster: Cluster, operators: OperatorRunner, engine: FakeEngine
) -> None:
    pipeline = await serving_pipeline(cluster, operators, engine)
    standalone = await eventually(lambda: one_standalone(cluster), what="the standalone pod")
    await cluster.fail_pod(standalone["metadata"]["name"], "CUDA out of memory")

    async def abandoned() -> bool:
        record = annotations(await pipeline_service(cluster, pipeline))
        return (
            "hydraserve.io/consolidation-abandoned" in record
            and not await standalone_pods(cluster)
            and await model_phase(cluster) == "Serving"
        )

    await eventually(abandoned, what="the consolidation abandoned")
    reason = annotations(await pipeline_service(cluster, pipeline))[
        "hydraserve.io/consolidation-abandoned"
    ]
    assert "CUDA out of memory" in reason
    assert [s["metadata"]["name"] for s in await cluster.services()] == [pipeline]
    assert await stage_pods(cluster, 2) is not None
    assert await instance_phases(cluster) == {pipeline: ("Ready", "cold_start")}
    model = await eventually(
        lambda: _status_if(cluster, lambda s: bool(s.get("consolidations"))),
        what="the abandoned consolidation in the history",
    )
    (given_up,) = model["status"]["consolidations"]
    assert (given_up["pipeline"], given_up["outcome"]) == (pipeline, "abandoned")
    assert "CUDA out of memory" in given_up["reason"] and given_up["releasedAt"] is None
    events = await cluster.events()
    assert any(e.get("reason") == "ConsolidationAbandoned" for e in events)
    # Given up for good: no new standalone on later passes.
    (app,) = [app for app, _, _ in operators.apps]
    await operator_passes(app.reconciler, NAMESPACE, "llama")
    assert not await standalone_pods(cluster)


async def test_scale_to_zero_while_consolidating_removes_pipeline_and_standalone(
    cluster: Cluster, operators: OperatorRunner, engine: FakeEngine
) -> None:
    await serving_pipeline(cluster, operators, engine)
    await eventually(lambda: one_standalone(cluster), what="the standalone pod")
    await cluster.scale("llama", 0)

    async def empty() -> bool:
        return not await cluster.pods() and not await cluster.services()

    await eventually(empty, what="everything deleted")
    await eventually(lambda: _status_if(cluster, lambda s: s.get("phase") == "Cold"), what="Cold")


async def test_scale_to_zero_while_draining_releases_the_pipeline_when_idle(
    cluster: Cluster, operators: OperatorRunner, engine: FakeEngine
) -> None:
    pipeline = await serving_pipeline(cluster, operators, engine)
    standalone = await eventually(lambda: one_standalone(cluster), what="the standalone pod")
    cluster.prefetchers["gpu-a"].full[cluster.store_uri] = "done"
    await cluster.run_pod(standalone, ip="10.1.0.9")
    await eventually(lambda: promoted(cluster, pipeline), what="pipeline Draining")

    # The standalone is the replica now: scaling to zero removes it at once; the pipeline
    # still finishes what it serves, then goes.
    await cluster.scale("llama", 0)
    await eventually(lambda: _no_standalone(cluster), what="the standalone deleted")

    async def only_draining() -> bool:
        return await instance_phases(cluster) == {pipeline: ("Draining", "cold_start")}

    await eventually(only_draining, what="only the draining pipeline in status")
    assert await stage_pods(cluster, 2) is not None
    engine.in_flight = 0

    async def empty() -> bool:
        return not await cluster.pods() and not await cluster.services()

    await eventually(empty, what="the pipeline released")
    # The phase is Cold from the moment nothing serves (before the release); the history
    # entry is written by the release's pass.
    model = await eventually(
        lambda: _status_if(
            cluster, lambda s: s.get("phase") == "Cold" and bool(s.get("consolidations"))
        ),
        what="Cold, with the consolidation in the history",
    )
    (done,) = model["status"]["consolidations"]
    assert (done["pipeline"], done["outcome"]) == (pipeline, "done")


async def _no_standalone(cluster: Cluster) -> bool:
    return not await standalone_pods(cluster)


async def test_consolidation_turned_off_removes_a_standalone_not_promoted_yet(
    cluster: Cluster, operators: OperatorRunner, engine: FakeEngine
) -> None:
    pipeline = await serving_pipeline(cluster, operators, engine)
    await eventually(lambda: one_standalone(cluster), what="the standalone pod")
    (first,) = [app for app, _, _ in operators.apps]
    await operators.crash(first)
    await operators.start(plan_with=PLANNER, consolidation=False, worker_port=engine.port)

    await eventually(lambda: _no_standalone(cluster), what="the standalone deleted")
    await eventually(
        lambda: _status_if(cluster, lambda s: s.get("phase") == "Serving"), what="Serving"
    )
    assert [s["metadata"]["name"] for s in await cluster.services()] == [pipeline]
    assert await instance_phases(cluster) == {pipeline: ("Ready", "cold_start")}


async def test_no_prefetcher_on_the_all_card_node_abandons_without_a_standalone(
    cluster: Cluster, operators: OperatorRunner, engine: FakeEngine
) -> None:
    """The all-card node's prefetcher verified the pipeline's stage, then went away: the
    pipeline serves (its bytes were verified, and the operator recorded that), but nothing
    can fetch the whole model there, so its consolidation is given up."""
    for node in ("gpu-a", "gpu-b"):
        await cluster.add_gpu_node(node)
        await cluster.add_prefetcher(node)
    await start_operator(operators, engine)
    await cluster.apply_model("llama", replicas=1)
    pods = await eventually(lambda: stage_pods(cluster, 2), what="both stage pods")
    pipeline = str(pods[0]["metadata"]["labels"]["hydraserve.io/instance"])

    async def verified() -> str | None:
        return annotations(await pipeline_service(cluster, pipeline)).get(
            "hydraserve.io/verified-at"
        )

    await eventually(verified, what="the stages' bytes recorded as verified")
    await cluster.remove_prefetcher("gpu-a")
    for p in pods:
        await cluster.run_pod(p)

    async def abandoned() -> str | None:
        record = annotations(await pipeline_service(cluster, pipeline))
        return record.get("hydraserve.io/consolidation-abandoned")

    reason = await eventually(abandoned, what="the consolidation abandoned")
    assert "no node prefetcher on gpu-a" in reason
    await eventually(
        lambda: _status_if(cluster, lambda s: s.get("phase") == "Serving"), what="Serving"
    )
    assert not await standalone_pods(cluster)
