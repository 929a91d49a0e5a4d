"""Bandwidth sharing of simulated fetches: max-min fairness, priorities, completions."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydraserve.sim.network import FlowNetwork, water_fill

GB = 1e9


def test_water_fill_hand_cases() -> None:
    assert water_fill([1.0, 2.0, 10.0], 6.0) == [1.0, 2.0, 3.0]
    assert water_fill([1.0, 2.0], math.inf) == [1.0, 2.0]
    assert water_fill([1.0, 2.0], 5.0) == [1.0, 2.0]
    assert water_fill([4.0, 4.0], 2.0) == [1.0, 1.0]
    assert water_fill([], 1.0) == []


@given(
    st.lists(st.floats(0.0, 100.0), min_size=1, max_size=20),
    st.floats(0.0, 500.0),
)
def test_water_fill_is_max_min_fair(caps: list[float], capacity: float) -> None:
    rates = water_fill(caps, capacity)
    assert all(0 <= r <= c + 1e-9 for r, c in zip(rates, caps, strict=True))
    assert sum(rates) <= capacity + 1e-6
    if sum(caps) > capacity:
        assert sum(rates) == pytest.approx(capacity, rel=1e-9, abs=1e-9)
        # Every flow below its cap gets the highest rate: nothing to gain by moving.
        top = max(rates)
        assert all(
            r == pytest.approx(top) for r, c in zip(rates, caps, strict=True) if r < c - 1e-9
        )


def test_flows_share_a_nic_and_finish_in_order() -> None:
    net = FlowNetwork([1 * GB], None)
    done: list[tuple[str, float]] = []
    a, _ = net.add(0.0, 0, 1 * GB, False, math.inf, lambda t: done.append(("a", t)))
    b, changed = net.add(0.0, 0, 2 * GB, False, math.inf, lambda t: done.append(("b", t)))
    assert {f.rate for f in changed} == {0.5 * GB}
    assert a.eta() == pytest.approx(2.0)  # 1 GB at 0.5 GB/s
    changed = net.remove(2.0, a)
    assert changed == [b] and b.rate == pytest.approx(1 * GB)
    assert b.eta() == pytest.approx(3.0)  # 1 GB left at 1 GB/s
    assert net.bytes_moved == pytest.approx(2 * GB)


def test_store_caps_and_low_priority_takes_the_leftover() -> None:
    net = FlowNetwork([1 * GB, 1 * GB, 2 * GB], 1.5 * GB)
    a, _ = net.add(0.0, 0, 10 * GB, False, math.inf, lambda t: None)
    b, _ = net.add(0.0, 1, 10 * GB, False, math.inf, lambda t: None)
    assert a.rate == pytest.approx(0.75 * GB) and b.rate == pytest.approx(0.75 * GB)
    low, _ = net.add(0.0, 2, 10 * GB, True, math.inf, lambda t: None)
    assert low.rate == 0.0  # the store is used up by high-priority fetches
    net.remove(1.0, b)
    assert a.rate == pytest.approx(1 * GB)  # NIC-bound now
    assert low.rate == pytest.approx(0.5 * GB)  # what the store has left


def test_low_priority_yields_on_its_own_nic() -> None:
    net = FlowNetwork([2 * GB], None)
    low, _ = net.add(0.0, 0, 10 * GB, True, math.inf, lambda t: None)
    assert low.rate == pytest.approx(2 * GB)
    high, _ = net.add(1.0, 0, 10 * GB, False, math.inf, lambda t: None)
    assert high.rate == pytest.approx(2 * GB) and low.rate == 0.0
    assert low.bytes_left == pytest.approx(8 * GB)  # settled at 1 s


def test_planner_view_of_inflight_fetches() -> None:
    net = FlowNetwork([1 * GB], None)
    net.add(0.0, 0, 4 * GB, False, 10.0, lambda t: None)
    net.settle(2.0)
    (fetch,) = net.inflight(0, 2.0)
    assert fetch.bytes_left == 2 * GB and fetch.deadline_s == pytest.approx(8.0)
    assert not fetch.low_priority
    assert net.inflight(1, 2.0) == ()
