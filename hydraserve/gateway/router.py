"""Routing: which ready instance gets a request (pure).

Least outstanding requests among the instances that are Ready, have an endpoint, are not
marked unreachable and have room under the per-instance cap. A pipeline group is a single
instance addressed at its head (stage 0 serves HTTP), so it is routed like any other.
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence

from hydraserve.backends.base import InstancePhase, InstanceView


def choose_instance(
    instances: Sequence[InstanceView],
    outstanding: Mapping[str, int],
    capacity: int,
    unreachable: Container[str] = frozenset(),
) -> InstanceView | None:
    """The routable instance with the fewest outstanding requests (first one on ties), or
    ``None`` when none is ready or all are at ``capacity``."""
    best: InstanceView | None = None
    best_load = capacity
    for instance in instances:
        if instance.phase != InstancePhase.READY or not instance.endpoint:
            continue
        if instance.name in unreachable:
            continue
        load = outstanding.get(instance.name, 0)
        if load < best_load:
            best, best_load = instance, load
    return best
