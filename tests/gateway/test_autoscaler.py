from __future__ import annotations

import asyncio

import pytest

from hydraserve.api.models import ScalingSpec
from hydraserve.gateway.autoscaler import Autoscaler, DemandWindow, desired_replicas
from hydraserve.gateway.catalog import Catalog
from tests.support.fakes import FakeClusterBackend, make_model


def scaling(**fields: int | float) -> ScalingSpec:
    return make_model("m", **fields).spec.scaling  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("in_flight", "expected"),
    [(0, 0), (1, 1), (8, 1), (9, 2), (16, 2), (17, 3), (1000, 4)],
)
def test_desired_is_ceil_of_demand_over_target_within_bounds(in_flight: int, expected: int) -> None:
    spec = scaling(min_replicas=0, max_replicas=4, target_concurrency=8)
    assert desired_replicas(spec, in_flight) == expected


def test_min_replicas_hold_without_demand() -> None:
    # (minReplicas > maxReplicas cannot happen: the spec's validator and CEL rule reject it.)
    assert desired_replicas(scaling(min_replicas=2, max_replicas=4), 0) == 2
    assert desired_replicas(scaling(min_replicas=2, max_replicas=4), 1) == 2
    assert desired_replicas(scaling(min_replicas=3, max_replicas=3), 100) == 3


def test_demand_window_keeps_the_peak_for_the_window_after_it_ended() -> None:
    window = DemandWindow()
    # 10 in flight until t=50, then 0.
    window.record(50.0, 10)
    assert window.peak(now=60.0, window=30.0, current=0) == 10
    assert window.peak(now=79.9, window=30.0, current=0) == 10
    assert window.peak(now=80.1, window=30.0, current=0) == 0
    assert window.peak(now=80.1, window=30.0, current=3) == 3


def test_demand_window_forgets_smaller_values_behind_a_larger_later_one() -> None:
    window = DemandWindow()
    window.record(1.0, 2)
    window.record(2.0, 7)
    window.record(3.0, 4)
    assert window.peak(now=3.0, window=10.0, current=1) == 7
    assert window.peak(now=12.5, window=10.0, current=1) == 4  # 7 ended at t=2
    assert window.peak(now=13.5, window=10.0, current=1) == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_autoscaler(
    backend: FakeClusterBackend, demand: dict[str, int], clock: Clock
) -> Autoscaler:
    # Through the catalog, as in the gateway: decisions by canonical id ("default/m"),
    # scale calls by the fake backend's own key ("m").
    return Autoscaler(Catalog(backend), lambda m: demand.get(m, 0), interval=0.01, clock=clock)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_first_request_scales_from_zero_at_once() -> None:
    backend = FakeClusterBackend([make_model("m", keep_alive_seconds=30)])
    demand: dict[str, int] = {}
    autoscaler = make_autoscaler(backend, demand, Clock())
    view = backend.get_model("m")
    assert view is not None
    demand["default/m"] = 1
    autoscaler.record(view, 0, 1)
    await settle()
    assert backend.scale_calls == [("m", 1)]
    # More requests that one replica absorbs ask for nothing more.
    demand["default/m"] = 2
    autoscaler.record(view, 1, 2)
    await settle()
    assert backend.scale_calls == [("m", 1)]


async def test_scale_up_follows_demand_and_stops_at_max() -> None:
    backend = FakeClusterBackend([make_model("m", target_concurrency=2, max_replicas=3)])
    demand = {"default/m": 0}
    autoscaler = make_autoscaler(backend, demand, Clock())
    for n in range(1, 11):
        demand["default/m"] = n
        view = backend.get_model("m")
        assert view is not None
        autoscaler.record(view, n - 1, n)
        await settle()
    assert [r for _, r in backend.scale_calls] == [1, 2, 3]


async def test_scale_to_zero_only_after_a_whole_keep_alive_without_requests() -> None:
    backend = FakeClusterBackend([make_model("m", keep_alive_seconds=30)])
    demand = {"default/m": 0}
    clock = Clock()
    autoscaler = make_autoscaler(backend, demand, clock)
    view = backend.get_model("m")
    assert view is not None
    demand["default/m"] = 1
    autoscaler.record(view, 0, 1)
    await settle()
    clock.now += 5.0
    demand["default/m"] = 0
    autoscaler.record(view, 1, 0)  # the request finished at t=1005
    clock.now += 29.0
    await autoscaler.tick()
    assert backend.scale_calls == [("m", 1)]
    clock.now += 2.0  # 31 s idle
    await autoscaler.tick()
    assert backend.scale_calls == [("m", 1), ("m", 0)]
    await autoscaler.tick()
    assert backend.scale_calls == [("m", 1), ("m", 0)]  # no repeated calls


async def test_min_replicas_are_requested_without_demand() -> None:
    backend = FakeClusterBackend([make_model("m", min_replicas=1)])
    autoscaler = make_autoscaler(backend, {}, Clock())
    await autoscaler.tick()
    assert backend.scale_calls == [("m", 1)]


async def test_replicas_existing_at_start_are_kept_for_one_keep_alive() -> None:
    backend = FakeClusterBackend()
    backend.add_model(make_model("m", keep_alive_seconds=30), desired_replicas=2)
    clock = Clock()
    autoscaler = make_autoscaler(backend, {}, clock)
    await autoscaler.tick()
    assert backend.scale_calls == []
    clock.now += 31
    await autoscaler.tick()
    assert backend.scale_calls == [("m", 0)]


async def test_broken_models_are_not_scaled() -> None:
    backend = FakeClusterBackend()
    backend.add_model(make_model("m", min_replicas=1), error="missing from the store")
    autoscaler = make_autoscaler(backend, {}, Clock())
    await autoscaler.tick()
    assert backend.scale_calls == []


async def test_a_failing_scale_call_is_retried_on_the_next_tick() -> None:
    class Flaky(FakeClusterBackend):
        failures = 1

        async def scale(self, name: str, replicas: int) -> None:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("API server unavailable")
            await super().scale(name, replicas)

    backend = Flaky([make_model("m", min_replicas=1)])
    autoscaler = make_autoscaler(backend, {}, Clock())
    await autoscaler.tick()
    assert backend.scale_calls == []
    await autoscaler.tick()
    assert backend.scale_calls == [("m", 1)]


async def test_decisions_are_reported() -> None:
    backend = FakeClusterBackend([make_model("m")])
    seen: list[tuple[str, int]] = []
    autoscaler = Autoscaler(
        Catalog(backend),
        lambda m: 3,
        interval=0.01,
        clock=Clock(),
        on_decision=lambda m, n: seen.append((m, n)),
    )
    await autoscaler.tick()
    assert seen == [("default/m", 1)]
