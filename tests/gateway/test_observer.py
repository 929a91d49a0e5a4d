"""Cold-start and instance metrics, from the backend's views alone."""

from __future__ import annotations

import time
from dataclasses import replace

from hydraserve.api.models import StageTiming
from hydraserve.backends.base import InstancePhase, InstanceView, ModelView
from hydraserve.gateway.metrics import GatewayMetrics
from hydraserve.gateway.observer import ClusterObserver, newly_ready
from tests.support.fakes import make_model


def sample(metrics: GatewayMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def starting(name: str) -> InstanceView:
    return InstanceView(name=name, model="m", pp=2, phase=InstancePhase.STARTING,
                        started_at=time.time())  # fmt: skip


def became_ready(instance: InstanceView, seconds: float = 8.0) -> InstanceView:
    timings = (
        StageTiming(stage="fetch", start=0.0, end=5.0),
        StageTiming(stage="imports", start=0.0, end=3.0),
        StageTiming(stage="weight_load", start=3.0, end=5.5),
    )
    return replace(instance, phase=InstancePhase.READY, endpoint="http://x",
                   ready_at=instance.started_at + seconds, cold_start=timings)  # fmt: skip


def test_newly_ready_ignores_seen_and_unready_instances() -> None:
    a = became_ready(starting("a"))
    b = starting("b")
    assert newly_ready(set(), [a, b]) == [a]
    assert newly_ready({"a"}, [a, b]) == []


def test_each_cold_start_is_recorded_once_with_its_stages() -> None:
    metrics = GatewayMetrics()
    observer = ClusterObserver(metrics)
    model = make_model("m")
    instance = starting("m-0")
    observer.observe([ModelView(model, 1, (instance,))])
    assert sample(metrics, "hydraserve_cold_starts_total", model="default/m") == 0
    assert sample(metrics, "hydraserve_instances", model="default/m", phase="Starting") == 1
    ready = became_ready(instance)
    for _ in range(3):  # seen again and again (periodic and on routing)
        observer.observe([ModelView(model, 1, (ready,))])
        observer.observe_model(ModelView(model, 1, (ready,)))
    assert sample(metrics, "hydraserve_cold_starts_total", model="default/m") == 1
    assert sample(metrics, "hydraserve_cold_start_seconds_sum", model="default/m") == 8.0
    assert sample(metrics, "hydraserve_cold_start_stage_seconds_sum", model="default/m",
                  stage="fetch") == 5.0  # fmt: skip
    assert sample(metrics, "hydraserve_cold_start_stage_seconds_sum", model="default/m",
                  stage="weight_load") == 2.5  # fmt: skip
    assert sample(metrics, "hydraserve_instances", model="default/m", phase="Ready") == 1
    assert sample(metrics, "hydraserve_instances", model="default/m", phase="Starting") == 0


def test_a_cold_start_is_recorded_when_its_record_is_whole_not_when_first_routable() -> None:
    # The local backend routes to a Ready engine a moment before it has read the worker's
    # timeline (ready_at unset, no stages yet): recording then would lose the breakdown.
    metrics = GatewayMetrics()
    observer = ClusterObserver(metrics)
    model = make_model("m")
    instance = starting("m-0")
    routable = replace(instance, phase=InstancePhase.READY, endpoint="http://x")
    observer.observe_model(ModelView(model, 1, (routable,)))
    assert sample(metrics, "hydraserve_cold_starts_total", model="default/m") == 0
    observer.observe_model(ModelView(model, 1, (became_ready(instance),)))
    assert sample(metrics, "hydraserve_cold_starts_total", model="default/m") == 1
    assert sample(metrics, "hydraserve_cold_start_stage_seconds_count", model="default/m",
                  stage="imports") == 1  # fmt: skip


def test_instances_ready_before_the_gateway_started_are_not_counted() -> None:
    metrics = GatewayMetrics()
    old = became_ready(replace(starting("m-0"), started_at=time.time() - 100), seconds=10)
    observer = ClusterObserver(metrics)
    observer.observe([ModelView(make_model("m"), 1, (old,))])
    assert sample(metrics, "hydraserve_cold_starts_total", model="default/m") == 0


def test_gone_models_leave_no_stale_series() -> None:
    metrics = GatewayMetrics()
    observer = ClusterObserver(metrics)
    observer.observe([ModelView(make_model("m"), 1, (starting("m-0"),))])
    observer.observe([])
    assert (
        metrics.registry.get_sample_value(
            "hydraserve_instances", {"model": "m", "phase": "Starting"}
        )
        is None
    )


def test_a_consolidation_is_recorded_once_and_its_standalone_is_no_cold_start() -> None:
    from hydraserve.api.models import ConsolidationStatus
    from hydraserve.backends.base import InstanceOrigin

    metrics = GatewayMetrics()
    observer = ClusterObserver(metrics, started_at=0.0)
    model = make_model("m")
    standalone = replace(
        became_ready(starting("m-solo")), pp=1, origin=InstanceOrigin.CONSOLIDATION
    )
    record = ConsolidationStatus(
        pipeline="m-pipe", standalone="m-solo", started_at=100.0,
        fetched_at=102.0, promoted_at=118.0, released_at=119.5,
    )  # fmt: skip
    view = ModelView(model, 1, (standalone,), consolidations=(record,))
    for _ in range(3):
        observer.observe([view])
    assert sample(metrics, "hydraserve_cold_starts_total", model="default/m") == 0
    assert (
        sample(metrics, "hydraserve_consolidations_total", model="default/m", outcome="done") == 1
    )
    assert sample(metrics, "hydraserve_consolidation_seconds_sum", model="default/m") == 19.5
    for stage, seconds in (("fetch", 2.0), ("promote", 18.0), ("drain", 1.5)):
        assert sample(metrics, "hydraserve_consolidation_stage_seconds_sum", model="default/m",
                      stage=stage) == seconds  # fmt: skip
    abandoned = record.model_copy(
        update={"pipeline": "m-pipe2", "outcome": "abandoned", "promoted_at": None,
                "released_at": None}
    )  # fmt: skip
    observer.observe([replace(view, consolidations=(record, abandoned))])
    assert (
        sample(metrics, "hydraserve_consolidations_total", model="default/m", outcome="abandoned")
        == 1
    )
    assert sample(metrics, "hydraserve_consolidation_seconds_count", model="default/m") == 1


def test_the_planners_error_is_recorded_with_each_cold_start() -> None:
    from hydraserve.api.models import ColdStartPrediction

    metrics = GatewayMetrics()
    observer = ClusterObserver(metrics)
    model = make_model("m")
    predicted = ColdStartPrediction(ttft_seconds=6.5, ready_seconds=6.0, terms={"fetch_s": 4.0})
    instance = replace(starting("m-0"), prediction=predicted)
    observer.observe([ModelView(model, 1, (instance,))])
    observer.observe([ModelView(model, 1, (became_ready(instance, seconds=8.0),))])
    # Measured 8 s against a predicted 6 s: +2 s (no _sum: the buckets go negative).
    name = "hydraserve_cold_start_prediction_error_seconds_bucket"
    assert sample(metrics, name, model="default/m", le="1.0") == 0
    assert sample(metrics, name, model="default/m", le="2.0") == 1
    assert (
        sample(metrics, "hydraserve_cold_start_prediction_error_seconds_count", model="default/m")
        == 1
    )
