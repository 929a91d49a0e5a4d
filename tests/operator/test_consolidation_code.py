"""The operator's consolidation decisions (pure): Kubernetes objects and HTTP answers ->
PipelineConsolidation records -> the shared plan, and what the replica count ignores."""

from __future__ import annotations

from typing import Any

import pytest

from hydraserve.api.models import (
    FailureStatus,
    InstanceOrigin,
    InstancePhase,
    ModelPhase,
    ServerlessModelStatus,
)
from hydraserve.backends.kubernetes import model_view
from hydraserve.control.consolidation import (
    Abandon,
    ConsolidationPolicy,
    FetchWholeModel,
    Promote,
    Release,
    StandaloneState,
    StartStandalone,
    consolidating,
    consolidation_plan,
    next_idle_since,
)
from hydraserve.control.instances import InstanceDecision, LifecyclePolicy, decide_instances
from hydraserve.control.placement import InstancePlan, StagePlan, all_card_stage, standalone_plan
from hydraserve.control.status import build_status
from hydraserve.operator.consolidation import (
    Observed,
    fetch_state,
    finished_record,
    pipeline_consolidation,
    pipelines,
    standalone_state,
    standalones,
    whole_model_fetch,
)
from hydraserve.operator.naming import (
    ABANDONED_ANNOTATION,
    CONSOLIDATES_LABEL,
    DRAINING_SINCE_ANNOTATION,
    FETCHED_AT_ANNOTATION,
    IDLE_SINCE_ANNOTATION,
    INSTANCE_LABEL,
    PLAN_ANNOTATION,
    PROMOTED_AT_ANNOTATION,
    REQUESTED_AT_ANNOTATION,
    STAGE_LABEL,
    TEMPLATE_HASH_ANNOTATION,
    is_dns_label,
    standalone_name,
)
from hydraserve.operator.records import group
from hydraserve.prefetcher.node import NodeStatus
from hydraserve.prefetcher.shm import FetchState, FetchStatus

GIB = 1 << 30
NOW = 1000.0
TIMEOUT = 900.0
POLICY = ConsolidationPolicy(enabled=True, drain_grace_seconds=1.0, drain_timeout_seconds=60.0)


def pipeline_plan() -> InstancePlan:
    return InstancePlan(
        pp=2,
        stages=[
            StagePlan(rank=0, node="gpu-a", gpu=1, start_layer=0, end_layer=16,
                      memory_bytes=8 * GIB, all_card=True, fetch_bytes=3 * GIB),
            StagePlan(rank=1, node="gpu-b", gpu=0, start_layer=16, end_layer=32,
                      memory_bytes=6 * GIB, all_card=False, fetch_bytes=4 * GIB),
        ],
        predicted_ttft_s=3.0,
    )  # fmt: skip


def service(
    name: str,
    plan: InstancePlan,
    annotations: dict[str, str] | None = None,
    consolidates: str | None = None,
    requested_at: float = 100.0,
) -> dict[str, Any]:
    labels = {INSTANCE_LABEL: name, "hydraserve.io/model": "m"}
    if consolidates:
        labels[CONSOLIDATES_LABEL] = consolidates
    return {
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {
                PLAN_ANNOTATION: plan.model_dump_json(),
                TEMPLATE_HASH_ANNOTATION: "t",
                REQUESTED_AT_ANNOTATION: str(requested_at),
                **(annotations or {}),
            },
        }
    }


def pod(instance: str, rank: int, ready: bool = True, phase: str = "Running") -> dict[str, Any]:
    conditions = [{"type": "Ready", "status": "True" if ready else "False"}]
    return {
        "metadata": {
            "name": f"{instance}-{rank}",
            "labels": {INSTANCE_LABEL: instance, STAGE_LABEL: str(rank)},
        },
        "spec": {"nodeName": "gpu-a" if rank == 0 else "gpu-b"},
        "status": {"phase": phase, "podIP": "10.0.0.1", "conditions": conditions},
    }


def pipeline_objects(
    name: str = "m-abcde", annotations: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return [service(name, pipeline_plan(), annotations)], [pod(name, 0), pod(name, 1)]


def standalone_objects(
    pipeline: str = "m-abcde",
    ready: bool = False,
    phase: str = "Running",
    annotations: dict[str, str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    name = standalone_name(pipeline)
    plan = standalone_plan(pipeline_plan())
    svc = service(name, plan, annotations, consolidates=pipeline, requested_at=200.0)
    return [svc], [pod(name, 0, ready=ready, phase=phase)]


def observed(*parts: tuple[list[dict[str, Any]], list[dict[str, Any]]]) -> list[Observed]:
    """As the reconciler observes them, every stage's bytes verified."""
    services = [s for p in parts for s in p[0]]
    pods = [q for p in parts for q in p[1]]
    return [(i, i.observation(verified_at=50.0)) for i in group(services, pods)]


def by_name(instances: list[Observed]) -> dict[str, Observed]:
    return {i.name: (i, o) for i, o in instances}


LIFECYCLE = LifecyclePolicy(start_timeout_s=TIMEOUT)


def decide(desired: int, instances: list[Observed]) -> InstanceDecision:
    obs = [o for _, o in instances]
    return decide_instances(desired, obs, "t", FailureStatus(), NOW, LIFECYCLE)


def status_of(
    desired: int, instances: list[Observed], previous: ServerlessModelStatus, **kw: Any
) -> ServerlessModelStatus:
    pairs = [(o, i.detail(None)) for i, o in instances]
    return build_status(desired=desired, instances=pairs, previous=previous, now=NOW, **kw)


# -- plans and names -----------------------------------------------------------------------


def test_standalone_plan_is_one_stage_on_the_all_card_node_holding_the_whole_model() -> None:
    plan = standalone_plan(pipeline_plan())
    assert plan.pp == 1
    (stage,) = plan.stages
    assert (stage.node, stage.gpu, stage.start_layer, stage.end_layer) == ("gpu-a", 1, 0, 32)
    assert stage.memory_bytes == 8 * GIB and stage.all_card  # one replica, not the pipeline's
    assert stage.fetch_bytes == 4 * GIB  # only what the node's stage did not fetch


def test_no_all_card_stage_no_consolidation() -> None:
    plan = pipeline_plan()
    plan.stages[0].all_card = False
    assert all_card_stage(plan) is None
    assert all_card_stage(None) is None
    with pytest.raises(ValueError, match="all-card"):
        standalone_plan(plan)


def test_standalone_name_is_stable_and_a_dns_label() -> None:
    assert standalone_name("llama-abcde") == "llama-abcde-c"
    long = "m" * 57 + "-abcde"
    assert is_dns_label(standalone_name(long)) and standalone_name(long) == standalone_name(long)


# -- HTTP answers ------------------------------------------------------------------------------


def node_status(uri: str, revision: str, full: dict[str, Any] | None) -> NodeStatus:
    fetches: dict[str, Any] = {"pp2-rank0": {"state": "done", "total": 5}}
    if full is not None:
        fetches["full"] = full
    holding = {"uri": uri, "revision": revision, "name": "x", "key": "x", "memory_bytes": 5,
               "complete": False, "last_used": 0.0, "fetches": fetches}  # fmt: skip
    return NodeStatus.model_validate(
        {
            "node": "gpu-a",
            "capacity_bytes": 9,
            "used_bytes": 5,
            "bytes_from_store": 5,
            "models": [holding],
        }
    )


def test_whole_model_fetch_reads_the_models_full_fetch_only() -> None:
    status = node_status("s3://m/x", "main", {"state": "fetching", "total": 9, "verified": 3})
    fetch = whole_model_fetch(status, "s3://m/x", "main")
    assert fetch is not None and fetch.state == FetchState.FETCHING and fetch.verified == 3
    assert whole_model_fetch(status, "s3://m/x", "v2") is None  # another revision
    assert whole_model_fetch(status, "s3://m/other", "main") is None
    assert whole_model_fetch(node_status("s3://m/x", "main", None), "s3://m/x", "main") is None
    assert whole_model_fetch(None, "s3://m/x", "main") is None


def test_an_old_failed_fetch_is_asked_again_a_new_one_abandons() -> None:
    old = FetchStatus(state=FetchState.FAILED, started_at=50.0)
    new = FetchStatus(state=FetchState.FAILED, started_at=150.0)
    assert fetch_state(old, since=100.0) is None
    assert fetch_state(new, since=100.0) == FetchState.FAILED
    assert fetch_state(FetchStatus(state=FetchState.DONE), since=100.0) == FetchState.DONE
    assert fetch_state(None, since=100.0) is None


def test_idle_since_starts_at_the_first_idle_answer_and_resets() -> None:
    assert next_idle_since(None, 0, NOW) == NOW
    assert next_idle_since(900.0, 0, NOW) == 900.0
    assert next_idle_since(900.0, 2, NOW) is None
    assert next_idle_since(900.0, None, NOW) is None  # no answer is not idle


# -- the standalone's state ------------------------------------------------------------------


def test_standalone_state_from_its_record_and_pod() -> None:
    def state(*parts: Any) -> tuple[StandaloneState, str | None]:
        inst = by_name(observed(pipeline_objects(), *parts)).get("m-abcde-c")
        return standalone_state(inst)

    assert state() == (StandaloneState.NONE, None)
    svc, _ = standalone_objects()
    assert state((svc, [])) == (StandaloneState.NONE, None)  # record only: start it again
    assert state(standalone_objects())[0] == StandaloneState.STARTING
    assert state(standalone_objects(ready=True))[0] == StandaloneState.WARM
    failed, why = state(standalone_objects(phase="Failed"))
    assert failed == StandaloneState.FAILED and why is not None and "ended" in why
    promoted = standalone_objects(ready=True, annotations={PROMOTED_AT_ANNOTATION: "500"})
    assert state(promoted)[0] == StandaloneState.SERVING


def test_the_pipelines_switch_promotes_its_standalone() -> None:
    """Promotion is one write on the pipeline's record; the standalone's own annotation
    may lag behind (an operator killed between the two writes)."""
    draining = pipeline_objects(annotations={DRAINING_SINCE_ANNOTATION: "500"})
    insts = {
        n: o for n, (_, o) in by_name(observed(draining, standalone_objects(ready=True))).items()
    }
    assert insts["m-abcde-c"].promoted and not insts["m-abcde-c"].pending
    assert insts["m-abcde-c"].phase == InstancePhase.READY
    assert insts["m-abcde"].phase == InstancePhase.DRAINING
    pending = observed(pipeline_objects(), standalone_objects(ready=True))
    insts = {n: o for n, (_, o) in by_name(pending).items()}
    assert insts["m-abcde-c"].pending and insts["m-abcde-c"].phase == InstancePhase.STARTING


# -- records -> the shared plan ----------------------------------------------------------------


def plan_for(
    *parts: Any,
    fetch: FetchStatus | None = None,
    in_flight: int | None = None,
    now: float = NOW,
    policy: ConsolidationPolicy = POLICY,
) -> list[Any]:
    insts = observed(*parts)
    found = standalones(insts)
    records = [
        pipeline_consolidation(p, found.get(p[0].name), fetch, in_flight, now)
        for p in pipelines(insts)
    ]
    return consolidation_plan(records, policy, now)


DONE = FetchStatus(state=FetchState.DONE, started_at=300.0)
FETCHING = FetchStatus(state=FetchState.FETCHING, started_at=300.0)


def test_a_ready_pipeline_fetches_and_starts_its_standalone_on_the_all_card_node() -> None:
    assert plan_for(pipeline_objects()) == [
        FetchWholeModel("m-abcde", "gpu-a"),
        StartStandalone("m-abcde", "gpu-a"),
    ]
    # Started and fetching: nothing to do yet; warm but still fetching: nothing either.
    assert plan_for(pipeline_objects(), standalone_objects(), fetch=FETCHING) == []
    assert plan_for(pipeline_objects(), standalone_objects(ready=True), fetch=FETCHING) == []


def test_a_pipeline_not_ready_or_consolidation_off_does_nothing() -> None:
    services, pods = pipeline_objects()
    pods[0] = pod("m-abcde", 0, ready=False)
    assert plan_for((services, pods)) == []
    assert plan_for(pipeline_objects(), policy=ConsolidationPolicy(enabled=False)) == []


def test_warm_standalone_and_verified_model_promote() -> None:
    parts = (pipeline_objects(), standalone_objects(ready=True))
    assert plan_for(*parts, fetch=DONE) == [Promote("m-abcde")]


def test_failed_standalone_or_fetch_abandons_and_an_abandoned_pipeline_is_left_alone() -> None:
    (action,) = plan_for(pipeline_objects(), standalone_objects(phase="Failed"), fetch=DONE)
    assert isinstance(action, Abandon) and "standalone engine failed" in action.reason
    failed = FetchStatus(state=FetchState.FAILED, started_at=300.0, error="store gone")
    (action,) = plan_for(pipeline_objects(), standalone_objects(), fetch=failed)
    assert isinstance(action, Abandon) and "store gone" in action.reason
    abandoned = pipeline_objects(annotations={ABANDONED_ANNOTATION: "it failed"})
    assert plan_for(abandoned) == []


def test_draining_pipeline_is_released_when_idle_for_the_grace_or_at_the_timeout() -> None:
    def draining(idle_since: str | None) -> Any:
        ann = {DRAINING_SINCE_ANNOTATION: "990"}
        if idle_since:
            ann[IDLE_SINCE_ANNOTATION] = idle_since
        return pipeline_objects(annotations=ann)

    promoted = standalone_objects(ready=True)
    assert plan_for(draining(None), promoted, in_flight=3) == []
    assert plan_for(draining(None), promoted, in_flight=0) == []  # idle from now on
    assert plan_for(draining("999.5"), promoted, in_flight=0) == []  # idle 0.5 s < 1 s
    assert plan_for(draining("998"), promoted, in_flight=0) == [Release("m-abcde", "drained")]
    assert plan_for(draining("998"), promoted, in_flight=1) == []  # busy again
    assert plan_for(draining("998"), promoted, in_flight=None) == []  # no answer
    (timeout,) = plan_for(draining(None), promoted, in_flight=5, now=990 + 60.0)
    assert isinstance(timeout, Release) and "timeout" in timeout.reason


# -- what the replica count owns -------------------------------------------------------------


def test_a_pending_standalone_is_no_replica_and_goes_with_its_pipeline() -> None:
    insts = observed(pipeline_objects(), standalone_objects(ready=True))
    assert decide(1, insts).empty  # not a second replica, not surplus
    gone = decide(0, insts)
    assert set(gone.delete) == {
        ("m-abcde", "scaled down to 0"),
        ("m-abcde-c", "its pipeline m-abcde is gone"),
    }
    orphan = observed(standalone_objects(ready=True))
    assert decide(1, orphan).delete == (("m-abcde-c", "its pipeline m-abcde is gone"),)
    # A failed pending standalone is the consolidation's to handle (Abandon), not decide's.
    failed = observed(pipeline_objects(), standalone_objects(phase="Failed"))
    assert decide(1, failed).empty


def test_a_draining_pipeline_is_no_replica_its_promoted_standalone_is() -> None:
    draining = pipeline_objects(annotations={DRAINING_SINCE_ANNOTATION: "990"})
    insts = observed(draining, standalone_objects(ready=True))
    assert decide(1, insts).empty
    actions = decide(2, insts)
    assert actions.create == 1 and not actions.delete


def test_status_shows_phases_origins_and_counts_replicas_as_the_gateway_routes() -> None:
    def status(*parts: Any, consolidating: bool = True) -> ServerlessModelStatus:
        return status_of(1, observed(*parts), ServerlessModelStatus(), consolidating=consolidating)

    before = status(pipeline_objects(), standalone_objects(ready=True))
    phases = {i.name: (i.phase, i.origin, i.ready) for i in before.instances}
    assert phases == {
        "m-abcde": (InstancePhase.READY, InstanceOrigin.COLD_START, True),
        "m-abcde-c": (InstancePhase.STARTING, InstanceOrigin.CONSOLIDATION, False),
    }
    assert (before.phase, before.replicas, before.ready_replicas) == (
        ModelPhase.CONSOLIDATING,
        1,
        1,
    )
    draining = pipeline_objects(annotations={DRAINING_SINCE_ANNOTATION: "990"})
    after = status(draining, standalone_objects(ready=True))
    phases = {i.name: (i.phase, i.ready) for i in after.instances}
    assert phases == {
        "m-abcde": (InstancePhase.DRAINING, False),
        "m-abcde-c": (InstancePhase.READY, True),
    }
    assert (after.replicas, after.ready_replicas) == (1, 1)
    done = status(standalone_objects(ready=True, annotations={PROMOTED_AT_ANNOTATION: "990"}))
    assert done.instances[0].phase == InstancePhase.READY
    assert done.last_cold_start_seconds is None  # a consolidation is not a cold start


def test_model_is_consolidating_while_a_pipeline_is_replaced_or_drains() -> None:
    def records(*parts: Any) -> list[Any]:
        insts = observed(*parts)
        return [pipeline_consolidation(p, None, None, None, NOW) for p in pipelines(insts)]

    assert consolidating(records(pipeline_objects()), POLICY)
    assert not consolidating(records(pipeline_objects()), ConsolidationPolicy(enabled=False))
    abandoned = pipeline_objects(annotations={ABANDONED_ANNOTATION: "x"})
    assert not consolidating(records(abandoned), POLICY)
    draining = pipeline_objects(annotations={DRAINING_SINCE_ANNOTATION: "990"})
    assert consolidating(records(draining), ConsolidationPolicy(enabled=False))
    assert not consolidating(records(standalone_objects(ready=True)), POLICY)


def test_a_finished_consolidation_is_recorded_from_its_annotations_and_kept_bounded() -> None:
    draining = pipeline_objects(
        annotations={DRAINING_SINCE_ANNOTATION: "990", FETCHED_AT_ANNOTATION: "980"}
    )
    insts = by_name(observed(draining, standalone_objects(ready=True)))
    record = finished_record(
        insts["m-abcde"][0], insts["m-abcde-c"][0], NOW, outcome="done", reason="drained"
    )
    assert (record.started_at, record.fetched_at, record.promoted_at, record.released_at) == (
        200.0,
        980.0,
        990.0,
        NOW,
    )
    assert record.standalone == "m-abcde-c" and record.outcome == "done"
    gave_up = finished_record(insts["m-abcde"][0], None, NOW, outcome="abandoned", reason="x")
    assert gave_up.released_at is None and gave_up.started_at == NOW

    previous = ServerlessModelStatus()
    for k in range(20):
        entry = record.model_copy(update={"pipeline": f"p{k}"})
        previous = status_of(0, [], previous, finished=[entry])
    assert [c.pipeline for c in previous.consolidations] == [f"p{k}" for k in range(4, 20)]
    again = status_of(0, [], previous, finished=[record])
    assert len(again.consolidations) == 16 and again.consolidations[-1] == record
    kept = status_of(0, [], again)
    assert kept.consolidations == again.consolidations


# -- the gateway's view ------------------------------------------------------------------------


def test_gateway_sees_draining_and_consolidation_instances() -> None:
    obj = {
        "metadata": {"name": "m", "namespace": "ns"},
        "spec": {"source": {"uri": "s3://models/m"}},
        "status": {
            "phase": "Consolidating",
            "instances": [
                {"name": "m-abcde", "pp": 2, "ready": False, "phase": "Draining",
                 "origin": "cold_start", "endpoint": "http://m-abcde:8000",
                 "workers": [{"pod": "m-abcde-0", "node": "gpu-a", "stage": 0, "layers": "0-2"}]},
                {"name": "m-abcde-c", "pp": 1, "ready": True, "phase": "Ready",
                 "origin": "consolidation", "endpoint": "http://m-abcde-c:8000"},
                # Written before phase existed: ready says what it is.
                {"name": "old", "pp": 1, "ready": True, "endpoint": "http://old:8000"},
            ],
            "consolidations": [
                {"pipeline": "m-zzzzz", "standalone": "m-zzzzz-c", "startedAt": 10.0,
                 "fetchedAt": 11.0, "promotedAt": 12.0, "releasedAt": 14.5,
                 "outcome": "done", "reason": "drained"},
            ],
        },
    }  # fmt: skip
    view = model_view(obj)
    assert view is not None
    got = {i.name: (i.phase, i.origin, i.node) for i in view.instances}
    assert got == {
        "m-abcde": (InstancePhase.DRAINING, InstanceOrigin.COLD_START, "gpu-a"),
        "m-abcde-c": (InstancePhase.READY, InstanceOrigin.CONSOLIDATION, None),
        "old": (InstancePhase.READY, InstanceOrigin.COLD_START, None),
    }
    assert [i.name for i in view.ready_instances] == ["m-abcde-c", "old"]
    (record,) = view.consolidations
    assert (record.pipeline, record.outcome) == ("m-zzzzz", "done")
    assert record.seconds == 4.5  # what hydraserve_consolidation_seconds observes


def test_the_standalone_pod_starts_eager_unless_told_otherwise() -> None:
    from hydraserve.api.models import ServerlessModelSpec
    from hydraserve.operator.manifests import standalone_objects as manifests
    from hydraserve.operator.settings import OperatorSettings

    model = {"metadata": {"name": "m", "namespace": "ns", "uid": "u"}}
    spec = ServerlessModelSpec.model_validate({"source": {"uri": "s3://models/m"}})
    plan = standalone_plan(pipeline_plan())

    def args(**settings: Any) -> list[str]:
        config = OperatorSettings(worker_compiled=True, **settings)
        service, pod = manifests(model, spec, "m-abcde", plan, "t", None, NOW, config)
        assert service["metadata"]["labels"][CONSOLIDATES_LABEL] == "m-abcde"
        assert pod["metadata"]["labels"][CONSOLIDATES_LABEL] == "m-abcde"
        return list(pod["spec"]["containers"][0]["args"])

    assert "--compiled" not in args()
    assert "--compiled" in args(consolidation_enforce_eager=False)
