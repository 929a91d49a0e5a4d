"""Properties of every plan on random clusters: no over-commit of GPU memory, NIC or store
bandwidth; every layer covered exactly once; SLO claims backed by the prediction."""

from __future__ import annotations

import itertools
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from hydraserve.planner import (
    SLO,
    ClusterState,
    GPUState,
    InflightFetch,
    ModelProfile,
    NodeState,
    Plan,
    PlannerConfig,
    PlanRequest,
    Unschedulable,
    plan,
)
from hydraserve.store.partition import balanced_layer_ranges

GB = 10**9
QUARTER_GB = GB // 4
GPU_TYPES = ("A10", "V100")


@st.composite
def models(draw: st.DrawFn) -> ModelProfile:
    layers = draw(st.integers(4, 12))
    layer_bytes = draw(st.lists(st.integers(1, 8), min_size=layers, max_size=layers))
    layer_bytes = [b * QUARTER_GB for b in layer_bytes]
    first, last = draw(st.integers(0, 4)) * QUARTER_GB, draw(st.integers(0, 4)) * QUARTER_GB
    partitions = {}
    for pp in range(1, 5):
        stages = []
        for rank, (lo, hi) in enumerate(balanced_layer_ranges(layer_bytes, first, last, pp)):
            nbytes = sum(layer_bytes[lo:hi]) + (first if rank == 0 else 0)
            nbytes += last if rank == pp - 1 else 0
            stages.append((lo, hi, nbytes))
        partitions[pp] = tuple(stages)
    total = sum(layer_bytes) + first + last
    speeds = st.dictionaries(st.sampled_from(GPU_TYPES), st.floats(0.005, 0.2), max_size=2)
    return ModelProfile(
        key="model",
        total_bytes=total,
        replica_bytes=total + draw(st.integers(0, 16)) * QUARTER_GB,
        partitions=partitions,
        prefill_s=draw(speeds),
        tpot_s=draw(speeds),
    )


@st.composite
def nodes(draw: st.DrawFn, index: int) -> NodeState:
    total = draw(st.sampled_from((8, 16, 24, 32))) * GB
    free = st.one_of(
        st.just(total), st.integers(0, total // QUARTER_GB).map(lambda q: q * QUARTER_GB)
    )
    gpus = tuple(GPUState(i, total, draw(free)) for i in range(draw(st.integers(1, 8))))
    inflight = tuple(
        InflightFetch(
            bytes_left=draw(st.integers(0, 32)) * QUARTER_GB,
            deadline_s=draw(st.floats(-2.0, 30.0)),
            low_priority=draw(st.booleans()),
        )
        for _ in range(draw(st.integers(0, 3)))
    )
    return NodeState(
        name=f"n{index}",
        gpus=gpus,
        nic_bytes_per_s=draw(st.sampled_from((0.25, 1.0, 2.0))) * GB,
        gpu_type=draw(st.sampled_from(GPU_TYPES)),
        cached_models=frozenset({"model"}) if draw(st.integers(0, 5)) == 0 else frozenset(),
        inflight=inflight,
    )


@st.composite
def clusters(draw: st.DrawFn) -> ClusterState:
    count = draw(st.integers(1, 8))
    store = draw(st.one_of(st.none(), st.sampled_from((1.0, 4.0, 16.0))))
    return ClusterState(
        tuple(draw(nodes(i)) for i in range(count)), None if store is None else store * GB
    )


configs = st.builds(
    PlannerConfig,
    engine_ready_floor_s=st.floats(0.0, 5.0),
    post_fetch_s=st.floats(0.0, 3.0),
    stage_hop_s=st.floats(0.0, 0.01),
    fetch_efficiency=st.sampled_from((0.8, 1.0)),
    network_admission=st.booleans(),
    use_cache=st.booleans(),
    exclusive_gpus=st.booleans(),
    placement=st.sampled_from(("slo_best_fit", "first_fit")),
    fallback=st.sampled_from(("pp1", "fastest")),
    compute_share_follows_memory=st.booleans(),
    tensor_parallel_efficiency=st.sampled_from((0.5, 0.8, 1.0)),
    part_card_pipelines=st.sampled_from(("never", "too_big_for_any_node", "whenever_no_room")),
)
requests = st.builds(
    PlanRequest,
    model=models(),
    slo=st.builds(SLO, ttft_s=st.floats(1.0, 60.0), tpot_s=st.floats(0.01, 0.5)),
    max_pp=st.integers(1, 4),
    waited_s=st.floats(0.0, 10.0),
    min_all_card=st.integers(1, 3),
    defer_when_busy=st.booleans(),
    tp=st.sampled_from((1, 1, 2, 4)),
)


def check_plan(
    result: Plan, request: PlanRequest, cluster: ClusterState, config: PlannerConfig
) -> None:
    model = request.model
    by_name = {n.name: n for n in cluster.nodes}
    assert 1 <= result.pp <= min(request.max_pp, config.max_pp)
    assert result.tp == request.tp
    stages = result.stages
    assert [s.rank for s in stages] == list(range(result.pp))
    # Every layer once, in the manifest's ranges for this pp.
    assert [(s.start_layer, s.end_layer) for s in stages] == [
        (lo, hi) for lo, hi, _ in model.partitions[result.pp]
    ]
    assert stages[0].start_layer == 0 and stages[-1].end_layer == model.num_layers
    assert all(a.end_layer == b.start_layer for a, b in itertools.pairwise(stages))
    # Distinct nodes (each stage fetches over its own NIC); stage 0 is an all-card head,
    # unless no node could hold a replica: then no stage is (and the plan says why).
    assert len({s.node for s in stages}) == result.pp
    if result.no_consolidation:
        assert config.part_card_pipelines != "never" and result.pp > 1
        if config.part_card_pipelines == "too_big_for_any_node":
            need = math.ceil(model.replica_bytes / request.tp)
            assert not any(
                sum(g.total_bytes >= need for g in n.gpus) >= request.tp for n in cluster.nodes
            )
        assert not any(s.all_card for s in stages)
        assert "cannot consolidate" in result.reason
    else:
        assert stages[0].all_card
    store_rates = 0.0
    new_fetches = 0
    for stage in stages:
        node = by_name[stage.node]
        # tp distinct GPUs of its node, each with its share free.
        assert stage.tp == request.tp == len(set(stage.devices))
        assert stage.gpu == stage.devices[0]
        gpus = [node.gpus[i] for i in stage.devices]
        assert [g.index for g in gpus] == list(stage.devices)
        # GPU memory: never more than free; exclusive workers take idle GPUs whole.
        assert all(stage.memory_per_gpu_bytes <= g.free_bytes for g in gpus)
        if config.exclusive_gpus:
            assert all(g.free_bytes == g.total_bytes for g in gpus)
            assert stage.memory_bytes == sum(g.total_bytes for g in gpus)
        elif stage.all_card:
            assert stage.memory_bytes == model.replica_bytes
        else:
            kv_share = math.ceil(model.kv_bytes / result.pp)
            assert stage.memory_bytes == model.partitions[result.pp][stage.rank][2] + kv_share
        if stage.from_cache:
            assert config.use_cache and model.key in node.cached_models
            assert stage.fetch_bytes == 0
            continue
        assert stage.fetch_bytes == model.partitions[result.pp][stage.rank][2]
        # NIC: the new fetch's rate is at most a fair share, and admission kept every
        # protected in-flight fetch within its deadline at that share.
        line = node.nic_bytes_per_s * config.fetch_efficiency
        active = [f for f in node.inflight if not f.low_priority]
        share = line / (len(active) + 1)
        assert stage.fetch_bytes_per_s <= share * (1 + 1e-9)
        if config.network_admission:
            for f in active:
                if f.bytes_left <= line / len(active) * f.deadline_s:
                    assert f.bytes_left <= share * f.deadline_s * (1 + 1e-9)
        store_rates += stage.fetch_bytes_per_s
        new_fetches += 1
    if cluster.store_bytes_per_s is not None and new_fetches:
        assert store_rates <= cluster.store_bytes_per_s * (1 + 1e-9)
    if result.meets_slo:
        assert result.prediction.ttft_s <= request.slo.ttft_s + 1e-9
        assert result.prediction.tpot_s <= request.slo.tpot_s + 1e-9
    assert result.reason


@settings(max_examples=400, deadline=None)
@given(requests, clusters(), configs)
def test_plans_never_overcommit_and_cover_every_layer(
    request: PlanRequest, cluster: ClusterState, config: PlannerConfig
) -> None:
    result = plan(request, cluster, config)
    assert plan(request, cluster, config) == result  # pure: same inputs, same answer
    if isinstance(result, Unschedulable):
        assert result.reason
        return
    check_plan(result, request, cluster, config)


@settings(max_examples=200, deadline=None)
@given(requests, clusters())
def test_unschedulable_without_admission_means_no_gpu_fits(
    request: PlanRequest, cluster: ClusterState
) -> None:
    config = PlannerConfig(network_admission=False, part_card_pipelines="never")
    result = plan(request, cluster, config)
    need = math.ceil(request.model.replica_bytes / request.tp)
    fits = any(sum(g.free_bytes >= need for g in n.gpus) >= request.tp for n in cluster.nodes)
    assert isinstance(result, Unschedulable) == (not fits)
