"""The operator's pure decisions: cluster view, stand-in planner, reconcile actions, status."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hydraserve.api.models import (
    FailureStatus,
    InstanceStatus,
    ModelPhase,
    ServerlessModelSpec,
    ServerlessModelStatus,
)
from hydraserve.api.validation import desired_replicas, spec_errors
from hydraserve.control.instances import (
    InstanceObservation,
    LifecyclePolicy,
    decide_instances,
    timed_out,
)
from hydraserve.control.placement import InstancePlan, StagePlan
from hydraserve.control.status import build_status
from hydraserve.operator.cluster_state import (
    cluster_state,
    gpu_resource_amount,
    parse_quantity,
    prefetcher_urls,
)
from hydraserve.operator.naming import (
    INSTANCE_LABEL,
    PLAN_ANNOTATION,
    REQUESTED_AT_ANNOTATION,
    STAGE_LABEL,
    TEMPLATE_HASH_ANNOTATION,
    head_selector,
    is_dns_label,
    new_instance_name,
    template_hash,
)
from hydraserve.operator.records import InstanceObjects, group
from hydraserve.operator.settings import OperatorSettings
from hydraserve.planner.types import SLO, ModelProfile, PlanRequest

GIB = 1 << 30
SETTINGS = OperatorSettings()


def node(name: str, gpus: int = 1, mem_gib: float | None = 24, **extra: Any) -> dict[str, Any]:
    labels = {"nvidia.com/gpu.memory": str(int(mem_gib * 1024))} if mem_gib else {}
    body: dict[str, Any] = {
        "metadata": {"name": name, "labels": labels, "annotations": extra.pop("annotations", {})},
        "spec": extra.pop("spec", {}),
        "status": {
            "allocatable": {"nvidia.com/gpu": str(gpus)},
            "conditions": extra.pop("conditions", [{"type": "Ready", "status": "True"}]),
        },
    }
    return body


def worker(node_name: str, gpu: int, mem: int, phase: str = "Running") -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"w-{node_name}-{gpu}",
            "annotations": {
                "hydraserve.io/node": node_name,
                "hydraserve.io/gpu": str(gpu),
                "hydraserve.io/gpu-memory-bytes": str(mem),
            },
        },
        "status": {"phase": phase},
    }


def test_cluster_state_reads_nodes_and_subtracts_running_workers() -> None:
    nodes = [
        node(
            "a",
            gpus=2,
            annotations={"hydraserve.io/nic-gbps": "25", "hydraserve.io/gpu-type": "A10"},
        ),
        node("cordoned", spec={"unschedulable": True}),
        node("notready", conditions=[{"type": "Ready", "status": "False"}]),
        node(
            "tainted", spec={"taints": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]}
        ),
        node("cpu-only", gpus=0),
    ]
    state, skipped = cluster_state(
        nodes, [worker("a", 0, 8 * GIB), worker("a", 1, 8 * GIB, phase="Failed")], SETTINGS
    )
    assert [n.name for n in state.nodes] == ["a"]
    a = state.nodes[0]
    assert a.nic_bytes_per_s == 25e9 / 8 and a.gpu_type == "A10"
    # Whole-GPU resource: a GPU with a worker is taken; a failed worker holds nothing.
    assert [(g.total_bytes, g.free_bytes) for g in a.gpus] == [(24 * GIB, 0), (24 * GIB, 24 * GIB)]
    assert skipped == {
        "cordoned": "cordoned",
        "notready": "not Ready",
        "tainted": "taint dedicated:NoSchedule is not tolerated",
        "cpu-only": "no allocatable nvidia.com/gpu",
    }


def test_memory_mode_shares_gpus_and_requests_units() -> None:
    settings = OperatorSettings(gpu_resource_name="example.com/gpu-mem", gpu_resource_mode="memory")
    n = {
        "metadata": {"name": "s", "labels": {"hydraserve.io/gpu-count": "2"}},
        "status": {
            "allocatable": {"example.com/gpu-mem": "48"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    state, _ = cluster_state([n], [worker("s", 0, 10 * GIB)], settings)
    assert [(g.total_bytes, g.free_bytes) for g in state.nodes[0].gpus] == [
        (24 * GIB, 14 * GIB),
        (24 * GIB, 24 * GIB),
    ]
    assert gpu_resource_amount(int(7.5 * GIB), settings) == 8
    assert gpu_resource_amount(int(7.5 * GIB), SETTINGS) == 1


def test_tolerated_taint_keeps_the_node() -> None:
    settings = OperatorSettings(
        worker_tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    )
    tainted = node("g", spec={"taints": [{"key": "nvidia.com/gpu", "effect": "NoSchedule"}]})
    state, skipped = cluster_state([tainted], [], settings)
    assert [n.name for n in state.nodes] == ["g"] and not skipped


def profile(replica_gib: float) -> PlanRequest:
    model = ModelProfile(
        key="s3://m/x@main",
        total_bytes=4 * GIB,
        replica_bytes=int(replica_gib * GIB),
        partitions={1: ((0, 32, 4 * GIB),), 2: ((0, 16, 2 * GIB), (16, 32, 2 * GIB))},
    )
    return PlanRequest(model=model, slo=SLO(ttft_s=10, tpot_s=0.2))


def test_prefetcher_urls_only_for_ready_pods_with_their_port() -> None:
    def pod(
        node_name: str, ready: bool, port: int = 8300, host_port: int | None = None
    ) -> dict[str, Any]:
        ports: dict[str, Any] = {"name": "http", "containerPort": port}
        if host_port:
            ports["hostPort"] = host_port
        return {
            "spec": {"nodeName": node_name, "containers": [{"ports": [ports]}]},
            "status": {
                "phase": "Running",
                "podIP": "10.0.0.1",
                "hostIP": "192.0.2.1",
                "conditions": [{"type": "Ready", "status": str(ready)}],
            },
        }

    pods = [pod("a", True, 9000), pod("b", False)]
    assert prefetcher_urls(pods, SETTINGS) == {"a": "http://10.0.0.1:9000"}
    host = OperatorSettings(prefetcher_use_host_port=True)
    assert prefetcher_urls([pod("c", True, 8300, 18300)], host) == {"c": "http://192.0.2.1:18300"}


def test_quantities() -> None:
    assert parse_quantity("16Gi") == 16 * GIB
    assert parse_quantity("500m") == 0.5
    assert parse_quantity(4) == 4


@pytest.mark.parametrize("model", ["llama", "7b-chat", "x" * 63])
def test_instance_names_are_dns_labels(model: str) -> None:
    name = new_instance_name(model)
    assert is_dns_label(name), name
    assert name.endswith(name[-5:]) and len(name) <= 63


def spec(**kw: Any) -> ServerlessModelSpec:
    return ServerlessModelSpec.model_validate({"source": {"uri": "s3://models/x"}, **kw})


def test_desired_replicas_bounded_by_scaling() -> None:
    assert desired_replicas(spec()) == 0
    assert desired_replicas(spec(replicas=3)) == 3
    assert desired_replicas(spec(replicas=9, scaling={"maxReplicas": 2})) == 2
    assert desired_replicas(spec(replicas=0, scaling={"minReplicas": 1})) == 1


def test_template_hash_ignores_scaling_but_not_engine() -> None:
    base = template_hash(spec(), "img")
    assert template_hash(spec(replicas=4, scaling={"maxReplicas": 8}), "img") == base
    assert template_hash(spec(engine={"args": ["--dtype=half"]}), "img") != base
    assert template_hash(spec(), "img2") != base


def record(name: str, template: str, requested: float, pp: int = 1) -> dict[str, Any]:
    plan = InstancePlan(
        pp=pp,
        stages=[
            StagePlan(
                rank=r,
                node=f"n{r}",
                gpu=0,
                start_layer=r,
                end_layer=r + 1,
                memory_bytes=GIB,
                all_card=r == 0,
                fetch_bytes=1,
            )
            for r in range(pp)
        ],
    )
    return {
        "metadata": {
            "name": name,
            "labels": {INSTANCE_LABEL: name},
            "annotations": {
                PLAN_ANNOTATION: plan.model_dump_json(),
                TEMPLATE_HASH_ANNOTATION: template,
                REQUESTED_AT_ANNOTATION: str(requested),
            },
        }
    }


def pod(instance: str, rank: int, phase: str = "Running", ready: bool = True) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"{instance}-{rank}",
            "labels": {INSTANCE_LABEL: instance, STAGE_LABEL: str(rank)},
        },
        "status": {
            "phase": phase,
            "conditions": [
                {
                    "type": "Ready",
                    "status": str(ready),
                    "lastTransitionTime": "2026-01-01T00:00:09Z",
                }
            ],
        },
    }


NOW = 1767225600.0  # 2026-01-01T00:00:00Z


POLICY = LifecyclePolicy(start_timeout_s=900)


def observed(
    instances: list[InstanceObjects], verified_at: float | None = NOW
) -> list[InstanceObservation]:
    """As the reconciler observes: every stage's bytes verified at ``verified_at``."""
    return [timed_out(i.observation(verified_at), NOW, POLICY) for i in instances]


def decide(desired: int, instances: list[InstanceObjects], template: str) -> Any:
    return decide_instances(desired, observed(instances), template, FailureStatus(), NOW, POLICY)


def status_of(
    instances: list[InstanceObjects],
    previous: ServerlessModelStatus,
    now: float,
    endpoints: dict[str, str] | None = None,
    verified_at: float | None = NOW,
    **kw: Any,
) -> ServerlessModelStatus:
    pairs: list[tuple[InstanceObservation, InstanceStatus]] = [
        (o, i.detail((endpoints or {}).get(i.name)))
        for i, o in zip(instances, observed(instances, verified_at), strict=True)
    ]
    return build_status(
        desired=1, instances=pairs, previous=previous, now=now, selector=head_selector("m"), **kw
    )


def test_decide_creates_completes_and_scales_down_not_ready_first() -> None:
    services = [record("m-ready", "t", NOW - 50), record("m-new", "t", NOW - 1, pp=2)]
    pods = [pod("m-ready", 0), pod("m-new", 0, ready=False)]
    instances = group(services, pods)
    assert [i.name for i in instances] == ["m-ready", "m-new"]
    assert instances[1].missing_ranks == (1,)

    up = decide(3, instances, "t")
    assert up.create == 1 and up.complete == (("m-new", (1,)),) and not up.delete
    down = decide(1, instances, "t")
    assert down.create == 0 and [n for n, _ in down.delete] == ["m-new"]
    zero = decide(0, instances, "t")
    assert sorted(n for n, _ in zero.delete) == ["m-new", "m-ready"]


def test_decide_replaces_failed_orphaned_and_timed_out_instances() -> None:
    services = [record("m-failed", "t", NOW - 5), record("m-slow", "t", NOW - 1000)]
    pods = [pod("m-failed", 0, phase="Failed"), pod("m-slow", 0, ready=False), pod("m-orphan", 0)]
    actions = decide(1, group(services, pods), "t")
    why = dict(actions.delete)
    assert "ended" in why["m-failed"]
    assert "not ready 1000 s" in why["m-slow"]
    assert "record is gone" in why["m-orphan"]
    # Two instances failed (the orphan's pods are only left over): back off, then retry.
    assert actions.failures.consecutive == 2 and actions.create == 0
    assert actions.retry_in is not None and actions.retry_in > 0


def test_decide_rolls_outdated_instances_after_replacements_are_ready() -> None:
    old = group([record("m-old", "t0", NOW - 100)], [pod("m-old", 0)])
    first = decide(1, old, "t1")
    assert first.create == 1 and not first.delete  # keep serving until the new one is ready
    both = group(
        [record("m-old", "t0", NOW - 100), record("m-new", "t1", NOW - 10)],
        [pod("m-old", 0), pod("m-new", 0)],
    )
    second = decide(1, both, "t1")
    assert second.create == 0 and [n for n, _ in second.delete] == ["m-old"]


def test_ready_needs_the_prefetchers_to_have_verified_every_stage() -> None:
    inst = group([record("m-a", "t", NOW)], [pod("m-a", 0)])
    unverified = status_of(inst, ServerlessModelStatus(), NOW + 10, verified_at=None)
    assert unverified.phase == ModelPhase.STARTING and unverified.ready_replicas == 0
    assert unverified.instances[0].endpoint is None
    verified = status_of(inst, unverified, NOW + 11, verified_at=NOW + 10)
    assert verified.phase == ModelPhase.SERVING and verified.ready_replicas == 1
    # Ready at the later of pod Ready (NOW + 9) and the last verified byte (NOW + 10).
    assert verified.instances[0].ready_at == NOW + 10
    assert verified.last_cold_start_seconds == 10.0


def test_build_status_serving_with_cold_start_breakdown() -> None:
    inst = group([record("m-a", "t", NOW)], [pod("m-a", 0)])
    status = status_of(
        inst, ServerlessModelStatus(), NOW + 10, {"m-a": "http://m-a.ns.svc:8000"}, NOW - 1
    )
    assert status.phase == ModelPhase.SERVING and status.ready_replicas == 1
    assert status.instances[0].endpoint == "http://m-a.ns.svc:8000"
    assert status.instances[0].cold_start[-1].stage == "load"
    assert status.last_cold_start_seconds == 9.0
    assert status.selector == "hydraserve.io/instance,hydraserve.io/model=m,hydraserve.io/stage=0"
    ready = next(c for c in status.conditions if c.type == "Ready")
    # Unchanged status keeps its transition time.
    again = status_of(inst, status, NOW + 99, verified_at=NOW - 1)
    assert next(c for c in again.conditions if c.type == "Ready").last_transition_time == (
        ready.last_transition_time
    )


def test_spec_errors_say_which_field_and_what_to_do() -> None:
    errors = spec_errors({"source": {"uri": "http://example.com/m"}, "slo": {"ttftSeconds": 0}})
    assert errors is not None
    assert "spec.source.uri: String should match pattern" in errors
    assert "spec.slo.ttftSeconds: Input should be greater than 0 (got 0)" in errors
    assert errors.endswith("Fix the spec and apply it again.")
    assert spec_errors({"source": {"uri": "s3://models/llama"}}) is None
    assert "spec.source: Field required" in (spec_errors({}) or "")


def test_instance_plan_roundtrip_from_annotation() -> None:
    raw = record("m-a", "t", NOW, pp=2)["metadata"]["annotations"][PLAN_ANNOTATION]
    plan = InstancePlan.model_validate(json.loads(raw))
    assert [s.layers for s in plan.stages] == ["0-1", "1-2"]


def test_build_status_shows_consolidating_while_a_pipeline_is_replaced() -> None:
    inst = group([record("m-a", "t", NOW)], [pod("m-a", 0)])
    status = status_of(inst, ServerlessModelStatus(), NOW, consolidating=True)
    assert status.phase == ModelPhase.CONSOLIDATING and status.ready_replicas == 1
    after = status_of(inst, status, NOW + 1)
    assert after.phase == ModelPhase.SERVING


def test_status_backing_off_then_failed_with_the_reason() -> None:
    failures = FailureStatus(
        consecutive=1, last_instance="m-x", last_error="exit 1", retry_at=NOW + 10, template="t"
    )
    backing = status_of([], ServerlessModelStatus(), NOW, failures=failures, retry_in=10.0)
    ready = next(c for c in backing.conditions if c.type == "Ready")
    assert backing.phase == ModelPhase.STARTING and ready.reason == "BackOff"
    assert "m-x failed (exit 1)" in ready.message
    gave_up = status_of([], backing, NOW, failures=failures, gave_up="5 instances failed")
    ready = next(c for c in gave_up.conditions if c.type == "Ready")
    assert gave_up.phase == ModelPhase.FAILED and ready.reason == "InstancesFailing"
