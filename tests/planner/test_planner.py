"""The planner on hand-worked cases.

Model: 8 layers of 1 GB, replica 10 GB (2 GB of KV), prefill 0.5 s, TPOT 50 ms on its
GPU type. Cost model: floor 2 s, post-fetch 1 s, no hop cost; NICs 1 GB/s. So:

* pp=1: fetch 8 s -> TTFT max(2, 8) + 1 + 0.5 = 9.5 s; TPOT 50 ms.
* pp=2, one all-card (10 GB) + one part-card (4 GB + 1 GB KV = 5 GB, half the compute):
  fetch 4 s; prefill 0.5 * (0.5 * 1 + 0.5 * 2) = 0.75 s -> TTFT 5.75 s;
  TPOT 0.05 * 1.5 = 75 ms.
* pp=2, two all-card: prefill 0.5 s -> TTFT 5.5 s; TPOT 50 ms.
* pp=4, one all-card + three part-card (2 + 0.5 GB = 2.5 GB, a quarter of the compute):
  fetch 2 s; prefill 0.5 * (0.25 + 3 * 0.25 * 4) = 1.625 s -> TTFT 4.625 s.
"""

from __future__ import annotations

import math

import pytest

from hydraserve.planner import (
    SLO,
    InflightFetch,
    Plan,
    PlanRequest,
    Unschedulable,
    cold_ttft_s,
    plan,
)
from hydraserve.planner.costmodel import salvageable_wait_s
from tests.planner.helpers import CONFIG, GB, cluster, model, node


def four_nodes(free: float = 16) -> list:
    return [node(f"n{i}", (free,)) for i in range(4)]


def as_plan(result: Plan | Unschedulable) -> Plan:
    assert isinstance(result, Plan), result
    return result


def test_smallest_pp_meeting_both_slos() -> None:
    result = as_plan(plan(PlanRequest(model(), SLO(8.0, 0.2)), cluster(*four_nodes()), CONFIG))
    assert result.pp == 2 and result.meets_slo
    assert [(s.start_layer, s.end_layer) for s in result.stages] == [(0, 4), (4, 8)]
    assert [s.all_card for s in result.stages] == [True, False]
    assert [s.memory_bytes for s in result.stages] == [10 * GB, 5 * GB]
    assert [s.fetch_bytes for s in result.stages] == [4 * GB, 4 * GB]
    assert result.stages[0].consolidation_bytes == 4 * GB  # the rest of the model
    assert result.stages[1].consolidation_bytes == 0
    assert result.prediction.ttft_s == pytest.approx(5.75)
    assert result.prediction.tpot_s == pytest.approx(0.075)
    assert result.prediction.terms["fetch_s"] == pytest.approx(4.0)
    assert result.prediction.terms["prefill_s"] == pytest.approx(0.75)
    # The fetch may take what the SLO leaves after post-fetch and prefill: 8 - 1 - 0.75.
    assert all(s.fetch_deadline_s == pytest.approx(6.25) for s in result.stages)
    assert len({s.node for s in result.stages}) == 2
    assert "smallest pp" in result.reason


def test_loose_slo_takes_pp1() -> None:
    result = as_plan(plan(PlanRequest(model(), SLO(10.0, 0.2)), cluster(*four_nodes()), CONFIG))
    assert result.pp == 1 and result.meets_slo
    assert result.prediction.ttft_s == pytest.approx(9.5)


def test_tpot_slo_forbids_part_card_workers() -> None:
    # 75 ms with a part-card stage misses 60 ms; two all-card stages run at 50 ms.
    result = as_plan(plan(PlanRequest(model(), SLO(8.0, 0.06)), cluster(*four_nodes()), CONFIG))
    assert result.pp == 2 and result.all_card == 2
    assert [s.memory_bytes for s in result.stages] == [10 * GB, 10 * GB]
    assert result.prediction.tpot_s == pytest.approx(0.05)
    assert result.prediction.ttft_s == pytest.approx(5.5)


def test_tpot_slo_forbids_pipelines_so_pp1_with_reason() -> None:
    config = CONFIG.model_copy(update={"stage_hop_s": 0.02})  # every hop costs 20 ms/token
    result = as_plan(plan(PlanRequest(model(), SLO(8.0, 0.06)), cluster(*four_nodes()), config))
    assert result.pp == 1 and not result.meets_slo
    assert result.prediction.ttft_s == pytest.approx(9.5)
    assert "TPOT" in result.reason and "falling back to pp=1" in result.reason


def test_unreachable_ttft_slo_falls_back_to_pp1_with_reason() -> None:
    result = as_plan(plan(PlanRequest(model(), SLO(3.0, 0.2)), cluster(*four_nodes()), CONFIG))
    assert result.pp == 1 and not result.meets_slo
    assert "TTFT 9.50 s > 3.00 s" in result.reason
    assert "falling back to pp=1" in result.reason
    assert result.stages[0].all_card and result.stages[0].memory_bytes == 10 * GB


def test_fastest_fallback_takes_the_quickest_tpot_feasible_plan() -> None:
    config = CONFIG.model_copy(update={"fallback": "fastest"})
    result = as_plan(plan(PlanRequest(model(), SLO(3.0, 0.2)), cluster(*four_nodes()), config))
    # pp=4 with four all-card workers: fetch 2 s, prefill 0.5 s -> 3.5 s.
    assert (result.pp, result.all_card) == (4, 4)
    assert result.prediction.ttft_s == pytest.approx(3.5)
    assert not result.meets_slo


def test_waited_time_counts_toward_ttft() -> None:
    request = PlanRequest(model(), SLO(8.0, 0.2), waited_s=3.0)
    result = as_plan(plan(request, cluster(*four_nodes()), CONFIG))
    assert (result.pp, result.all_card) == (4, 1)  # pp=2 would give 8.75 s
    assert result.prediction.ttft_s == pytest.approx(3.0 + 4.625)
    assert result.prediction.terms["waited_s"] == 3.0


def test_min_all_card_gives_standalone_instances() -> None:
    request = PlanRequest(model(), SLO(8.0, 0.2), min_all_card=2)
    result = as_plan(plan(request, cluster(*four_nodes()), CONFIG))
    assert result.pp == 2 and result.all_card == 2


def test_busy_nic_is_avoided() -> None:
    # n0 is the tighter fit, but its NIC carries a fetch that needs 0.8 GB/s until its
    # deadline: sharing with a new fetch (0.5 GB/s each) would make it late.
    busy = InflightFetch(bytes_left=4 * GB, deadline_s=5.0)
    nodes = [node("n0", (10.5,), inflight=[busy]), node("n1", (16,))]
    request = PlanRequest(model(), SLO(60.0, 0.2), max_pp=1)
    result = as_plan(plan(request, cluster(*nodes), CONFIG))
    assert result.stages[0].node == "n1"
    assert result.stages[0].fetch_bytes_per_s == pytest.approx(1 * GB)
    # Without admission the tighter fit wins, at half the NIC.
    blind = CONFIG.model_copy(update={"network_admission": False})
    result = as_plan(plan(request, cluster(*nodes), blind))
    assert result.stages[0].node == "n0"
    assert result.stages[0].fetch_bytes_per_s == pytest.approx(0.5 * GB)


def test_consolidation_fetches_yield_and_late_fetches_are_not_protected() -> None:
    low = InflightFetch(bytes_left=4 * GB, deadline_s=5.0, low_priority=True)
    late = InflightFetch(bytes_left=10 * GB, deadline_s=5.0)  # late even alone
    request = PlanRequest(model(), SLO(60.0, 0.2), max_pp=1)
    for fetch, share in ((low, 1.0), (late, 0.5)):
        nodes = [node("n0", (10.5,), inflight=[fetch]), node("n1", (16,))]
        result = as_plan(plan(request, cluster(*nodes), CONFIG))
        assert result.stages[0].node == "n0"
        assert result.stages[0].fetch_bytes_per_s == pytest.approx(share * GB)


def test_every_node_refusing_fetches_is_unschedulable_with_reason() -> None:
    busy = InflightFetch(bytes_left=4 * GB, deadline_s=5.0)
    nodes = [node("n0", (16,), inflight=[busy]), node("n1", (4,))]
    result = plan(PlanRequest(model(), SLO(60.0, 0.2)), cluster(*nodes), CONFIG)
    assert isinstance(result, Unschedulable)
    assert "refusing new fetches" in result.reason and "9.3 GiB" in result.reason


def test_cached_node_wins() -> None:
    # n0 holds the model in host memory: a local start needs no network and beats a
    # tighter fit (n1) and faster NICs.
    nodes = [
        node("n0", (16,), nic=0.1 * GB, cached=["m"]),
        node("n1", (10,), nic=2 * GB),
        node("n2", (16,), nic=2 * GB),
    ]
    result = as_plan(plan(PlanRequest(model(), SLO(5.0, 0.2)), cluster(*nodes), CONFIG))
    assert result.pp == 1 and result.meets_slo
    (stage,) = result.stages
    assert (stage.node, stage.from_cache, stage.fetch_bytes) == ("n0", True, 0)
    assert math.isinf(stage.fetch_deadline_s)
    # 8 GB from host memory at 10 GB/s overlaps the 2 s floor: 2 + 1 + 0.5.
    assert result.prediction.ttft_s == pytest.approx(3.5)
    assert "host cache" in result.reason
    # Without cache awareness the same cluster needs the network.
    blind = CONFIG.model_copy(update={"use_cache": False})
    result = as_plan(plan(PlanRequest(model(), SLO(5.0, 0.2)), cluster(*nodes), blind))
    assert not any(s.from_cache for s in result.stages)


def test_no_gpu_fits_is_unschedulable_with_reason() -> None:
    nodes = [node("n0", (8, 9)), node("n1", (9.5,))]
    for mode in ("never", "too_big_for_any_node"):  # (idle, a 16 GB GPU would fit it)
        strict = CONFIG.model_copy(update={"part_card_pipelines": mode})
        result = plan(PlanRequest(model(), SLO(8.0, 0.2)), cluster(*nodes), strict)
        assert isinstance(result, Unschedulable)
        assert "9.3 GiB" in result.reason and "8.8 GiB on n1" in result.reason
    # Asked to, a pipeline of part-card stages serves it; it cannot consolidate, and says so.
    eager = CONFIG.model_copy(update={"part_card_pipelines": "whenever_no_room"})
    result = as_plan(plan(PlanRequest(model(), SLO(8.0, 0.2)), cluster(*nodes), eager))
    assert result.pp == 2 and not any(s.all_card for s in result.stages)
    assert "9.3 GiB" in result.no_consolidation and "8.8 GiB on n1" in result.no_consolidation
    assert result.no_consolidation in result.reason
    # Nothing fits even as a pipeline: Unschedulable, naming both.
    result = plan(PlanRequest(model(), SLO(8.0, 0.2)), cluster(node("n0", (2, 9))), eager)
    assert isinstance(result, Unschedulable)
    assert "9.3 GiB" in result.reason


def test_best_fit_across_nodes_and_gpus() -> None:
    nodes = [node("n0", (16,)), node("n1", (16, 11, 10.5, 9)), node("n2", (12,))]
    result = as_plan(plan(PlanRequest(model(), SLO(60.0, 0.2)), cluster(*nodes), CONFIG))
    (stage,) = result.stages
    assert (stage.node, stage.gpu, stage.memory_bytes) == ("n1", 2, 10 * GB)


def test_best_fit_only_among_nodes_fast_enough() -> None:
    # n1 is the tighter fit but its slow NIC would miss the 10 s SLO (8 GB at 0.5 GB/s).
    nodes = [node("n0", (16,)), node("n1", (10.5,), nic=0.5 * GB)]
    result = as_plan(plan(PlanRequest(model(), SLO(10.0, 0.2), max_pp=1), cluster(*nodes), CONFIG))
    assert result.stages[0].node == "n0"


def test_first_fit_takes_inventory_order() -> None:
    nodes = [node("n0", (16,)), node("n1", (10.5,))]
    request = PlanRequest(model(), SLO(60.0, 0.2), max_pp=1)
    first = CONFIG.model_copy(update={"placement": "first_fit"})
    assert as_plan(plan(request, cluster(*nodes), first)).stages[0].node == "n0"
    assert as_plan(plan(request, cluster(*nodes), CONFIG)).stages[0].node == "n1"


def test_exclusive_gpus_take_idle_gpus_whole() -> None:
    exclusive = CONFIG.model_copy(update={"exclusive_gpus": True})
    request = PlanRequest(model(), SLO(60.0, 0.2), max_pp=1)
    result = as_plan(plan(request, cluster(node("n0", (12, 16))), exclusive))
    assert (result.stages[0].gpu, result.stages[0].memory_bytes) == (1, 16 * GB)
    result2 = plan(request, cluster(node("n0", (12, 15))), exclusive)
    assert isinstance(result2, Unschedulable) and "idle GPU" in result2.reason


def test_store_share_caps_fetch_rate() -> None:
    # A 1.5 GB/s store shared by two new fetches: 0.75 GB/s each, below the NICs.
    nodes = [node("n0", (16,)), node("n1", (16,))]
    result = as_plan(
        plan(PlanRequest(model(), SLO(8.0, 0.2)), cluster(*nodes, store=1.5 * GB), CONFIG)
    )
    assert result.pp == 2
    assert all(s.fetch_bytes_per_s == pytest.approx(0.75 * GB) for s in result.stages)
    assert result.prediction.ttft_s == pytest.approx(4 / 0.75 + 1 + 0.75)


def test_busy_store_allows_only_cache_starts() -> None:
    # A fetch elsewhere needs 1.6 GB/s of the 2 GB/s store; one more would halve it.
    tight = InflightFetch(bytes_left=4 * GB, deadline_s=2.5)
    busy = node("busy", (1,), nic=2 * GB, inflight=[tight])
    request = PlanRequest(model(), SLO(60.0, 0.2))
    result = plan(request, cluster(busy, node("n0", (16,)), store=2 * GB), CONFIG)
    assert isinstance(result, Unschedulable) and "store is busy" in result.reason
    cached = node("n1", (16,), cached=["m"])
    result = as_plan(plan(request, cluster(busy, node("n0", (16,)), cached, store=2 * GB), CONFIG))
    assert result.stages[0].node == "n1" and result.stages[0].from_cache


def test_defer_when_busy() -> None:
    # The store can take one more fetch (pp=1, too slow for the SLO) but not two (pp=2).
    tight = InflightFetch(bytes_left=3 * GB, deadline_s=2.0)
    nodes = [node("busy", (1,), nic=2 * GB, inflight=[tight]), *four_nodes()]
    request = PlanRequest(model(), SLO(8.0, 0.2))
    fallback = as_plan(plan(request, cluster(*nodes, store=4 * GB), CONFIG))
    assert fallback.pp == 1 and not fallback.meets_slo
    deferred = plan(
        PlanRequest(model(), SLO(8.0, 0.2), defer_when_busy=True),
        cluster(*nodes, store=4 * GB),
        CONFIG,
    )
    assert isinstance(deferred, Unschedulable) and "deferred" in deferred.reason


def test_pp_capped_by_request_and_config() -> None:
    request = PlanRequest(model(), SLO(8.0, 0.2), max_pp=1)
    assert as_plan(plan(request, cluster(*four_nodes()), CONFIG)).pp == 1
    capped = CONFIG.model_copy(update={"max_pp": 1})
    assert (
        as_plan(plan(PlanRequest(model(), SLO(8.0, 0.2)), cluster(*four_nodes()), capped)).pp == 1
    )


def test_pp_limited_by_distinct_nodes() -> None:
    # Two nodes: pp=4 is impossible, pp=2 misses 5 s -> pp=1 fallback.
    nodes = [node("n0", (16, 16, 16, 16)), node("n1", (16, 16, 16, 16))]
    result = as_plan(plan(PlanRequest(model(), SLO(5.0, 0.2)), cluster(*nodes), CONFIG))
    assert result.pp == 1 and not result.meets_slo


def test_cold_ttft_closed_form() -> None:
    # 26 GB over two 2 GB/s links: 6.5 s of fetch hides the 4 s floor; + 2 s post-fetch.
    assert cold_ttft_s(
        link_bytes_per_s=2e9, model_bytes=26 * GB, pp=2, engine_ready_floor_s=4.0
    ) == pytest.approx(8.5)
    assert cold_ttft_s(
        link_bytes_per_s=2e9, model_bytes=4 * GB, pp=4, engine_ready_floor_s=4.0, prefill_s=0.3
    ) == pytest.approx(6.3)


def test_salvageable_wait() -> None:
    config = CONFIG  # fastest cold start: floor 2 + post 1 = 3 s
    assert salvageable_wait_s([10.0, 4.0, 1.0], 7.5, config) == 4.0
    assert salvageable_wait_s([10.0, 5.0], 7.5, config) is None
    assert salvageable_wait_s([], 7.5, config) is None
