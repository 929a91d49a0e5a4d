"""Models larger than one GPU: tensor parallel inside a node x pipeline across nodes.

A Llama-2-70B-class model (138 GB of fp16 weights, 158 GB with its KV cache) cannot sit on
one 80 GB GPU. With ``tp = 4`` a stage is 4 GPUs of one node, each holding a quarter of the
stage's memory; pipeline stages still go to distinct nodes, each fetching its bytes once
over its node's NIC for all its ranks.
"""

from __future__ import annotations

import math

import pytest

from hydraserve.planner import (
    SLO,
    ClusterState,
    GPUState,
    NodeState,
    Plan,
    PlannerConfig,
    PlanRequest,
    Unschedulable,
    plan,
)
from hydraserve.planner.costmodel import tensor_parallel_speedup
from hydraserve.sim.catalog import LLAMA2_70B

GB = 10**9
GIB = 2**30
NIC = 100e9 / 8  # 100 Gbps
CONFIG = PlannerConfig(engine_ready_floor_s=4.0, post_fetch_s=2.0, tensor_parallel_efficiency=0.8)
MODEL = LLAMA2_70B.profile("llama-2-70b", mean_prompt_tokens=250)
SLOS = SLO(ttft_s=10.0, tpot_s=0.060)


def server(
    name: str, free_gb: tuple[float, ...] = (80,) * 8, gpu_type: str = "H100", total_gb: int = 80
) -> NodeState:
    gpus = tuple(GPUState(i, total_gb * GB, int(f * GB)) for i, f in enumerate(free_gb))
    return NodeState(name, gpus, NIC, gpu_type)


def as_plan(result: Plan | Unschedulable) -> Plan:
    assert isinstance(result, Plan), result
    return result


def request(tp: int = 4, slo: SLO = SLOS, max_pp: int = 4) -> PlanRequest:
    return PlanRequest(MODEL, slo, max_pp=max_pp, tp=tp)


def test_70b_is_placed_with_tp_inside_nodes_and_pp_across_them_within_its_slos() -> None:
    assert MODEL.total_bytes > 130 * GB and MODEL.replica_bytes > 80 * GB
    nodes = [server(f"h100-{i}") for i in range(4)]
    result = as_plan(plan(request(), ClusterState(tuple(nodes)), CONFIG))
    # pp = 1 would fetch 138 GB over one NIC (~11 s): the SLO asks for a pipeline.
    assert (result.pp, result.tp) == (2, 4) and result.meets_slo
    assert result.prediction.ttft_s <= SLOS.ttft_s and result.prediction.tpot_s <= SLOS.tpot_s
    head, tail = result.stages
    assert head.node != tail.node  # pipeline across nodes ...
    for stage in result.stages:  # ... tensor parallel inside each
        assert stage.tp == 4 and len(set(stage.devices)) == 4 and stage.gpu == stage.devices[0]
        assert stage.memory_per_gpu_bytes == math.ceil(stage.memory_bytes / 4)
    # The head holds a whole replica on its 4 GPUs (it consolidates there) ...
    assert head.all_card and head.memory_bytes == MODEL.replica_bytes
    assert head.consolidation_bytes == MODEL.total_bytes - head.fetch_bytes
    # ... the tail its half of the weights and of the KV cache.
    nbytes = MODEL.partitions[2][1][2]
    assert not tail.all_card
    assert tail.memory_bytes == nbytes + math.ceil(MODEL.kv_bytes / 2)
    # Each node's NIC fetches its stage's bytes once for all 4 ranks, at the full rate.
    assert [s.fetch_bytes for s in result.stages] == [p[2] for p in MODEL.partitions[2]]
    assert all(s.fetch_bytes_per_s == pytest.approx(NIC) for s in result.stages)
    assert result.prediction.terms["fetch_s"] == pytest.approx(
        max(p[2] for p in MODEL.partitions[2]) / NIC
    )
    assert "pp=2 x tp=4" in result.reason
    assert result.prediction.terms["tp"] == 4


def test_predicted_speed_accounts_for_tp() -> None:
    nodes = ClusterState(tuple(server(f"h100-{i}") for i in range(4)))
    loose = SLO(ttft_s=60.0, tpot_s=1.0)
    by_tp = {tp: as_plan(plan(request(tp, loose), nodes, CONFIG)) for tp in (2, 4, 8)}
    for tp, result in by_tp.items():
        assert result.pp == 1 and result.tp == tp
        # A whole replica on tp GPUs: the profiled single-GPU TPOT over the tp speed-up.
        speedup = 1 + (tp - 1) * CONFIG.tensor_parallel_efficiency
        assert speedup == tensor_parallel_speedup(tp, CONFIG.tensor_parallel_efficiency)
        assert result.prediction.tpot_s == pytest.approx(MODEL.tpot_s["H100"] / speedup)
        assert result.prediction.terms["prefill_s"] == pytest.approx(
            MODEL.prefill_s["H100"] / speedup
        )
    assert by_tp[8].prediction.tpot_s < by_tp[4].prediction.tpot_s < by_tp[2].prediction.tpot_s
    # A perfect all-reduce would scale linearly; the configured efficiency is what is lost.
    ideal = as_plan(
        plan(
            request(4, loose), nodes, CONFIG.model_copy(update={"tensor_parallel_efficiency": 1.0})
        )
    )
    assert ideal.prediction.tpot_s == pytest.approx(MODEL.tpot_s["H100"] / 4)


def test_best_fit_takes_the_node_whose_free_gpus_fit_tightest() -> None:
    per_gpu = math.ceil(MODEL.replica_bytes / 4) / GB  # ~39.5 GB
    nodes = [
        server("roomy"),  # 8 idle GPUs
        # 4 GPUs with just enough for a quarter of a replica, 4 busy: the tightest fit.
        server("snug", (per_gpu + 0.5,) * 4 + (5,) * 4),
        # Only 3 GPUs with room: cannot host a 4-GPU worker at all.
        server("three", (80,) * 3 + (5,) * 5),
        server("roomy-2"),
    ]
    result = as_plan(plan(request(), ClusterState(tuple(nodes)), CONFIG))
    head = result.stages[0]
    assert head.node == "snug" and head.devices == (0, 1, 2, 3)
    assert all(s.node != "three" for s in result.stages)


def test_refused_with_the_reason_when_no_node_has_tp_gpus_free() -> None:
    # Every node has at most 3 GPUs with room for anything: a 4-GPU worker fits nowhere.
    nodes = [server(f"busy-{i}", (80, 80, 80, 2, 2, 2, 2, 2)) for i in range(4)]
    result = plan(request(), ClusterState(tuple(nodes)), CONFIG)
    assert isinstance(result, Unschedulable)
    per_gpu = math.ceil(MODEL.replica_bytes / 4) / GIB
    assert f"no node has 4 GPUs with {per_gpu:.1f} GiB free each" in result.reason
    assert "llama-2-70b" in result.reason
    # Nodes of 2 GPUs can never host tp = 4.
    small = [
        NodeState(f"pair-{i}", (GPUState(0, 80 * GB, 80 * GB), GPUState(1, 80 * GB, 80 * GB)), NIC)
        for i in range(4)
    ]
    result = plan(request(), ClusterState(tuple(small)), CONFIG)
    assert isinstance(result, Unschedulable) and "4 GPUs" in result.reason


def test_a_model_larger_than_any_node_is_a_pipeline_that_stays_and_says_why() -> None:
    # Nodes of 4 x 24 GB: no node could ever hold a replica (39.5 GB per GPU at tp 4), but
    # a half (19.75 GB per GPU) fits: a pipeline of part-card stages that cannot consolidate.
    nodes = [server(f"a10-{i}", (24,) * 4, gpu_type="A10", total_gb=24) for i in range(3)]
    loose = SLO(ttft_s=60.0, tpot_s=1.0)
    result = as_plan(plan(request(4, loose), ClusterState(tuple(nodes)), CONFIG))
    assert result.pp >= 2 and result.tp == 4
    assert not any(s.all_card for s in result.stages)
    assert all(s.consolidation_bytes == 0 for s in result.stages)
    assert "no node has 4 GPUs with" in result.no_consolidation
    assert f"{24 * GB / GIB:.1f} GiB free on each of 4 GPUs" in result.no_consolidation
    assert result.no_consolidation in result.reason
    # Switched off, the same cluster is Unschedulable.
    strict = CONFIG.model_copy(update={"part_card_pipelines": "never"})
    assert isinstance(plan(request(4, loose), ClusterState(tuple(nodes)), strict), Unschedulable)


def test_a_busy_cluster_waits_for_room_for_a_replica_unless_told_otherwise() -> None:
    # 80 GB GPUs, but only 25 GB free on 4 of them per node: idle, a node could hold a
    # replica, so by default the planner answers Unschedulable (retry when memory frees)
    # rather than start a pipeline that could never consolidate.
    nodes = [server(f"busy-{i}", (25,) * 4 + (2,) * 4) for i in range(3)]
    result = plan(request(), ClusterState(tuple(nodes)), CONFIG)
    assert isinstance(result, Unschedulable) and "no node has 4 GPUs with" in result.reason
    eager = CONFIG.model_copy(update={"part_card_pipelines": "whenever_no_room"})
    result = as_plan(plan(request(), ClusterState(tuple(nodes)), eager))
    assert result.pp >= 2 and not any(s.all_card for s in result.stages)
    assert f"{25 * GB / GIB:.1f} GiB free on each of 4 GPUs" in result.no_consolidation


def test_exclusive_gpus_take_tp_idle_gpus_whole() -> None:
    exclusive = CONFIG.model_copy(update={"exclusive_gpus": True})
    nodes = [server("mixed", (80,) * 5 + (79,) * 3), server("idle")]
    loose = SLO(ttft_s=60.0, tpot_s=1.0)
    result = as_plan(plan(request(4, loose), ClusterState(tuple(nodes)), exclusive))
    (stage,) = result.stages
    assert stage.tp == 4 and stage.memory_bytes == 4 * 80 * GB
    node = next(n for n in nodes if n.name == stage.node)
    assert all(node.gpus[i].free_bytes == 80 * GB for i in stage.devices)


def test_tp_1_plans_are_unchanged() -> None:
    from tests.planner.helpers import CONFIG as SMALL
    from tests.planner.helpers import cluster, model, node

    nodes = cluster(node("n0", (16, 12)), node("n1", (16,)))
    one = as_plan(plan(PlanRequest(model(), SLO(20.0, 0.2)), nodes, SMALL))
    assert one.tp == 1 and all(s.devices == (s.gpu,) and s.gpus == (s.gpu,) for s in one.stages)
