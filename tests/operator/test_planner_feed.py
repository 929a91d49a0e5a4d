"""The real planner on Kubernetes sees what the node prefetchers report.

Each case builds a node inventory where the placement depends on a prefetcher's report
(a whole model in host memory, a fetch in flight with a deadline), then runs the same
inventory without that report: the operator's choice must differ. The planner is the
production one (no stand-in); the prefetchers are real HTTP servers speaking the
prefetcher's own status model.
"""

from __future__ import annotations

import time
from typing import Any

from hydraserve.operator.reconciler import load_manifest
from hydraserve.planner import PlannerConfig
from hydraserve.prefetcher.shm import FetchState, FetchStatus
from tests.operator.conftest import Cluster, OperatorRunner, eventually

# The planner's default constants (engine-ready floor 4 s, post-fetch 2 s) with an SLO
# that a fetch of the model over these links cannot meet but a host-cache load can. The
# demo model is a few MB, so its links are slower than the planner's default floor for a
# usable link: lowered here.
SLOW_FETCH_S = 200.0
PLANNER = PlannerConfig(min_fetch_bytes_per_s=1.0)


def node_of(pod: dict[str, Any]) -> str:
    affinity = pod["spec"]["affinity"]["nodeAffinity"]
    terms = affinity["requiredDuringSchedulingIgnoredDuringExecution"]
    return str(terms["nodeSelectorTerms"][0]["matchFields"][0]["values"][0])


def gbps_for(total_bytes: int, seconds: float) -> float:
    """A NIC rate at which fetching ``total_bytes`` takes ``seconds``."""
    return total_bytes * 8 / 1e9 / seconds


async def placed_on(cluster: Cluster) -> str:
    try:
        pods = await eventually(cluster.pods, what="a worker pod")
    except AssertionError:
        model = await cluster.model("llama")
        raise AssertionError(f"no pod; model status: {(model or {}).get('status')}") from None
    assert len(pods) == 1, "one pp = 1 instance expected"
    return node_of(pods[0])


async def cache_inventory(cluster: Cluster, cached: bool) -> None:
    total = load_manifest(cluster.store_uri, "main").total_bytes
    nic = gbps_for(total, SLOW_FETCH_S)
    # Equal links: with no plan meeting the SLO, the pp = 1 fallback takes the first node
    # in inventory order (gpu-a). Only gpu-z can hold the model in host memory.
    await cluster.add_gpu_node("gpu-a", gpu_memory_gib=16, nic_gbps=nic)
    await cluster.add_gpu_node("gpu-z", gpu_memory_gib=16, nic_gbps=nic)
    await cluster.add_prefetcher("gpu-a")
    holder = await cluster.add_prefetcher("gpu-z")
    if cached:
        holder.cached.add((cluster.store_uri, "main"))


async def test_node_holding_the_model_in_host_memory_wins(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cache_inventory(cluster, cached=True)
    await operators.start(planner=PLANNER)
    await cluster.apply_model("llama", replicas=1, slo={"ttftSeconds": 20})
    assert await placed_on(cluster) == "gpu-z"
    events = [e for e in await cluster.events() if e.get("reason") == "InstancePlanned"]
    assert events and "gpu-z" in events[0]["message"]
    assert "smallest pp meeting both SLOs" in events[0]["message"]


async def test_without_the_cache_report_best_fit_decides(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await cache_inventory(cluster, cached=False)
    await operators.start(planner=PLANNER)
    await cluster.apply_model("llama", replicas=1, slo={"ttftSeconds": 20})
    assert await placed_on(cluster) == "gpu-a"
    events = [e for e in await cluster.events() if e.get("reason") == "InstancePlanned"]
    assert events and "falling back" in events[0]["message"]


async def busy_inventory(cluster: Cluster, deadline_known: bool) -> None:
    """Both nodes fetch the model in 5 s alone, well within the SLO. The small node's link
    carries another model's fetch that meets its deadline alone but not when shared."""
    total = load_manifest(cluster.store_uri, "main").total_bytes
    nic = gbps_for(total, 5.0)
    await cluster.add_gpu_node("gpu-small", gpu_memory_gib=16, nic_gbps=nic)
    await cluster.add_gpu_node("gpu-big", gpu_memory_gib=80, nic_gbps=nic)
    small = await cluster.add_prefetcher("gpu-small")
    await cluster.add_prefetcher("gpu-big")
    rate = nic * 1e9 / 8
    due_in = 120.0
    small.fetches[("s3://models/other", "main")] = {
        "full": FetchStatus(
            state=FetchState.FETCHING,
            total=int(0.75 * rate * due_in),
            started_at=time.time(),
            deadline=time.time() + due_in if deadline_known else None,
        )
    }


async def test_a_busy_node_is_avoided(cluster: Cluster, operators: OperatorRunner) -> None:
    await busy_inventory(cluster, deadline_known=True)
    await operators.start(planner=PLANNER)
    await cluster.apply_model("llama", replicas=1, slo={"ttftSeconds": 60})
    assert await placed_on(cluster) == "gpu-big"


async def test_a_fetch_without_a_deadline_shares_the_link_but_blocks_nothing(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    await busy_inventory(cluster, deadline_known=False)
    await operators.start(planner=PLANNER)
    await cluster.apply_model("llama", replicas=1, slo={"ttftSeconds": 60})
    assert await placed_on(cluster) == "gpu-small"


async def test_preloads_carry_the_plan_deadline(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    total = load_manifest(cluster.store_uri, "main").total_bytes
    await cluster.add_gpu_node("gpu-a", nic_gbps=gbps_for(total, 5.0))
    recorder = await cluster.add_prefetcher("gpu-a")
    await operators.start(planner=PLANNER)
    before = time.time()
    await cluster.apply_model("llama", replicas=1, slo={"ttftSeconds": 60})
    await eventually(cluster.pods, what="a worker pod")
    (call,) = recorder.calls
    # The fetch must end in time for the predicted TTFT: after now, within the SLO.
    assert call["deadline"] is not None and before < call["deadline"] < before + 60
    # ... and the prefetcher reports it back, which is what later plans read.
    (status,) = recorder.fetches[(cluster.store_uri, "main")].values()
    assert status.deadline == call["deadline"]


async def test_passes_read_nodes_and_reservations_from_watches_not_lists(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    """Two whole-GPU nodes, two models: the second model's plan must see the first one's
    worker (from the watch-fed index, or the pod just created) and take the other node,
    and no pass LISTs Nodes or every worker pod."""
    await cluster.add_gpu_node("gpu-a", gpu_memory_gib=16)
    await cluster.add_gpu_node("gpu-b", gpu_memory_gib=16)
    await cluster.add_prefetcher("gpu-a")
    await cluster.add_prefetcher("gpu-b")
    app = await operators.start(planner=PLANNER)
    client = app.reconciler.client
    listed: list[str] = []
    real_list = client.list

    async def counting_list(path: str, labels: Any = None) -> list[dict[str, Any]]:
        listed.append(path)
        return await real_list(path, labels)

    client.list = counting_list  # type: ignore[method-assign]
    await cluster.apply_model("first", replicas=1)
    await eventually(cluster.pods, what="the first worker")
    await cluster.apply_model("second", replicas=1)
    pods = await eventually(lambda: _two(cluster), what="both workers", timeout=20)
    assert sorted(node_of(p) for p in pods) == ["gpu-a", "gpu-b"]
    assert listed, "no pass ran"
    assert "/api/v1/nodes" not in listed
    assert "/api/v1/pods" not in listed  # cluster-wide: every worker's reservation


async def _two(cluster: Cluster) -> list[dict[str, Any]] | None:
    pods = await cluster.pods()
    return pods if len(pods) == 2 else None


async def test_a_cold_start_records_its_prediction_and_calibrates_the_planner(
    cluster: Cluster, operators: OperatorRunner
) -> None:
    """The plan's prediction is in the instance's status; once it is ready the measured
    cold start is fed to the calibration, whose state the operator keeps in a ConfigMap
    (read back by a restarted operator)."""
    from hydraserve.kube.client import path_of
    from hydraserve.operator.reconciler import CALIBRATION_CONFIGMAP, CALIBRATION_KEY
    from hydraserve.planner.calibration import CalibrationState
    from tests.operator.conftest import SYSTEM_NAMESPACE

    await cluster.add_gpu_node("gpu-a")
    await cluster.add_prefetcher("gpu-a")
    app = await operators.start(
        planner=PLANNER, calibration_min_samples=1, calibration_min_interval_seconds=0
    )
    await cluster.apply_model("llama", replicas=1)
    (pod,) = await eventually(cluster.pods, what="a worker pod")
    status = await eventually(lambda: _instance(cluster), what="instance status")
    prediction = status["prediction"]
    assert prediction["readySeconds"] > 0 and "engine_ready_floor_s" in prediction["terms"]
    await cluster.run_pod(pod)

    path = path_of("v1", "configmaps", SYSTEM_NAMESPACE, CALIBRATION_CONFIGMAP)
    saved = await eventually(lambda: cluster.client.get(path), what="the calibration ConfigMap")
    state = CalibrationState.model_validate_json(saved["data"][CALIBRATION_KEY])
    assert state.cold_starts == 1 and state.fitted
    assert app.reconciler.calibrator.state.fitted == state.fitted

    restarted = await operators.start(planner=PLANNER)
    await cluster.scale("llama", 0)  # a change, so the new operator reconciles

    async def reloaded() -> bool:
        return restarted.reconciler.calibrator.state.fitted == state.fitted

    await eventually(reloaded, what="the restarted operator's calibration")


async def _instance(cluster: Cluster) -> dict[str, Any] | None:
    model = await cluster.model("llama")
    instances = ((model or {}).get("status") or {}).get("instances") or []
    return instances[0] if instances else None
