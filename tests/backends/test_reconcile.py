"""The instance-level reconcile plan shared by the local backend."""

from __future__ import annotations

from hydraserve.backends.base import InstancePhase, InstanceView
from hydraserve.control.replicas import MAX_CONSECUTIVE_FAILURES, plan_instances


def inst(
    name: str,
    phase: InstancePhase,
    started: float = 0.0,
    ready: float | None = None,
    error: str | None = None,
) -> InstanceView:
    return InstanceView(
        name=name, model="m", pp=1, phase=phase, started_at=started, ready_at=ready, error=error
    )


def test_starts_what_is_missing_and_removes_failed() -> None:
    actions = plan_instances(2, [inst("a", InstancePhase.READY), inst("b", InstancePhase.FAILED)])
    assert actions.start == 1 and actions.stop == ("b",)


def test_nothing_to_do_when_converged() -> None:
    assert plan_instances(1, [inst("a", InstancePhase.READY)]).empty


def test_scale_down_stops_starting_then_newest_ready() -> None:
    instances = [
        inst("old", InstancePhase.READY, started=1, ready=10),
        inst("new", InstancePhase.READY, started=2, ready=20),
        inst("booting", InstancePhase.STARTING, started=3),
    ]
    assert plan_instances(1, instances).stop == ("booting", "new")
    assert plan_instances(0, instances).stop == ("booting", "new", "old")


def test_gives_up_after_repeated_failures_with_the_last_error() -> None:
    failed = [inst("a", InstancePhase.FAILED, error="engine crashed: CUDA OOM")]
    actions = plan_instances(1, failed, consecutive_failures=MAX_CONSECUTIVE_FAILURES)
    assert actions.start == 0 and actions.stop == ("a",)
    assert actions.give_up is not None and "CUDA OOM" in actions.give_up
