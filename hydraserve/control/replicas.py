"""Instance-level reconcile plan: which instances to start and stop for a replica count.

Pure; the local backend applies it with processes, the operator with pods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hydraserve.backends.base import InstancePhase, InstanceView

MAX_CONSECUTIVE_FAILURES = 3


@dataclass(frozen=True)
class InstanceActions:
    start: int = 0
    stop: tuple[str, ...] = ()
    give_up: str | None = None  # set when instances keep failing: the model's error

    @property
    def empty(self) -> bool:
        return self.start == 0 and not self.stop and self.give_up is None


def plan_instances(
    desired: int, instances: Sequence[InstanceView], consecutive_failures: int = 0
) -> InstanceActions:
    """Start or stop instances so that ``desired`` are live (Starting or Ready).

    Scale-down stops instances that are still starting before ready ones (they serve no
    one yet), and the newest ready ones before the oldest. Failed instances are removed.
    After ``MAX_CONSECUTIVE_FAILURES`` failures in a row nothing new is started.
    """
    live = [i for i in instances if i.phase in (InstancePhase.STARTING, InstancePhase.READY)]
    failed = tuple(i.name for i in instances if i.phase == InstancePhase.FAILED)
    if consecutive_failures >= MAX_CONSECUTIVE_FAILURES and desired > 0:
        last = next((i.error for i in reversed(instances) if i.error), None)
        return InstanceActions(
            stop=failed,
            give_up=f"{consecutive_failures} instances failed in a row; last error: {last}",
        )
    if len(live) < desired:
        return InstanceActions(start=desired - len(live), stop=failed)
    surplus = len(live) - desired
    if surplus <= 0:
        return InstanceActions(stop=failed)
    order = sorted(
        live,
        key=lambda i: (i.phase == InstancePhase.READY, -(i.ready_at or 0.0), -i.started_at),
    )
    return InstanceActions(stop=failed + tuple(i.name for i in order[:surplus]))
