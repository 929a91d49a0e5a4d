from __future__ import annotations

from dataclasses import replace

from hydraserve.backends.base import InstancePhase, InstanceView
from hydraserve.gateway.router import choose_instance
from tests.support.fakes import ready_instance


def instances() -> list[InstanceView]:
    return [
        ready_instance("m", "a", "http://a"),
        ready_instance("m", "b", "http://b"),
        ready_instance("m", "c", "http://c"),
    ]


def test_picks_the_least_outstanding_ready_instance() -> None:
    chosen = choose_instance(instances(), {"a": 3, "b": 1, "c": 2}, capacity=10)
    assert chosen is not None and chosen.name == "b"


def test_ties_go_to_the_first_instance_and_idle_ones_win() -> None:
    assert choose_instance(instances(), {}, capacity=10).name == "a"  # type: ignore[union-attr]
    assert choose_instance(instances(), {"a": 1}, capacity=10).name == "b"  # type: ignore[union-attr]


def test_only_ready_instances_with_an_endpoint_are_routable() -> None:
    starting = replace(instances()[0], phase=InstancePhase.STARTING)
    draining = replace(instances()[1], phase=InstancePhase.DRAINING)
    failed = replace(instances()[2], phase=InstancePhase.FAILED)
    no_endpoint = InstanceView(name="d", model="m", pp=1, phase=InstancePhase.READY)
    assert choose_instance([starting, draining, failed, no_endpoint], {}, capacity=10) is None
    ready = ready_instance("m", "e", "http://e")
    chosen = choose_instance([starting, draining, failed, no_endpoint, ready], {}, capacity=10)
    assert chosen == ready


def test_instances_at_capacity_are_skipped() -> None:
    chosen = choose_instance(instances(), {"a": 2, "b": 2, "c": 1}, capacity=2)
    assert chosen is not None and chosen.name == "c"
    assert choose_instance(instances(), {"a": 2, "b": 2, "c": 2}, capacity=2) is None


def test_unreachable_instances_are_skipped() -> None:
    chosen = choose_instance(instances(), {"b": 5}, capacity=10, unreachable={"a", "c"})
    assert chosen is not None and chosen.name == "b"
    assert choose_instance(instances(), {}, capacity=10, unreachable={"a", "b", "c"}) is None


def test_a_pipeline_group_is_one_instance_at_its_head() -> None:
    group = replace(ready_instance("m", "group", "http://stage0:8100"), pp=4)
    chosen = choose_instance([group], {}, capacity=10)
    assert chosen is not None and chosen.endpoint == "http://stage0:8100"
