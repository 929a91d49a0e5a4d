"""Where a tensor-parallel pipeline consolidates: the all-card stage's node and its tp GPUs,
or nowhere (no node had them free), and then the pipeline stays and its status says why."""

from __future__ import annotations

from hydraserve.api.models import InstancePhase, ModelPhase
from hydraserve.control import reasons
from hydraserve.control.consolidation import (
    ConsolidationPolicy,
    PipelineConsolidation,
    consolidating,
    consolidation_plan,
    consolidation_target,
    no_consolidation_condition,
)
from hydraserve.control.placement import InstancePlan, standalone_plan
from hydraserve.control.status import model_phase
from hydraserve.planner import SLO, ClusterState, Plan, PlanRequest, plan
from tests.planner.test_tensor_parallel import CONFIG, MODEL, server

TP4 = SLO(ttft_s=10.0, tpot_s=0.060)


def planned(*nodes: object) -> InstancePlan:
    result = plan(PlanRequest(MODEL, TP4, tp=4), ClusterState(tuple(nodes)), CONFIG)  # type: ignore[arg-type]
    assert isinstance(result, Plan), result
    return InstancePlan.from_plan(result)


def test_a_node_with_tp_gpus_free_for_a_replica_is_the_target() -> None:
    pipeline = planned(*(server(f"h100-{i}") for i in range(3)))
    assert (pipeline.pp, pipeline.tp) == (2, 4)
    head = pipeline.stage(0)
    assert consolidation_target(pipeline) == head.node
    assert no_consolidation_condition(pipeline) is None
    # The standalone takes the same 4 GPUs, with the replica's memory the head holds.
    standalone = standalone_plan(pipeline)
    (stage,) = standalone.stages
    assert (standalone.tp, stage.node, stage.devices) == (4, head.node, head.devices)
    assert (
        stage.memory_bytes == MODEL.replica_bytes
        and stage.memory_per_gpu_bytes * 4 >= MODEL.replica_bytes
    )
    # A record round-trips as JSON (it is kept on the instance's Service).
    assert InstancePlan.model_validate_json(pipeline.model_dump_json()) == pipeline


def test_without_one_the_pipeline_stays_and_status_says_why() -> None:
    pipeline = planned(*(server(f"a10-{i}", (24,) * 4, total_gb=24) for i in range(3)))
    assert pipeline.pp >= 2 and not any(s.all_card for s in pipeline.stages)
    assert consolidation_target(pipeline) is None
    condition = no_consolidation_condition(pipeline)
    assert condition is not None
    assert (condition.type, condition.status) == (reasons.CONSOLIDATION, "False")
    assert condition.reason == reasons.NO_CONSOLIDATION_TARGET
    assert f"stays a {pipeline.pp}-stage pipeline" in condition.message
    assert "no node has 4 GPUs with" in condition.message
    # The consolidation plan leaves it alone, and the model is Serving, not Consolidating.
    record = PipelineConsolidation(
        "p", pipeline.pp, InstancePhase.READY, all_card_node=consolidation_target(pipeline)
    )
    policy = ConsolidationPolicy()
    assert consolidation_plan([record], policy, now=0.0) == []
    assert not consolidating([record], policy)
    assert (
        model_phase(error=None, desired=1, ready=1, live=1, consolidating=False)
        == ModelPhase.SERVING
    )
    # Asking for a standalone anyway says why there is none.
    try:
        standalone_plan(pipeline)
    except ValueError as exc:
        assert "no node has 4 GPUs" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("standalone_plan accepted a pipeline without an all-card stage")
