"""The instance lifecycle policy (pure): replicas, roll-outs, failure backoff, giving up."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hydraserve.api.models import FailureStatus, InstancePhase
from hydraserve.control.instances import (
    InstanceObservation,
    LifecyclePolicy,
    backoff_delay,
    decide_instances,
    timed_out,
)

POLICY = LifecyclePolicy(start_timeout_s=60, backoff_base_s=10, backoff_cap_s=45, max_failures=4)
T = "tmpl"


def inst(name: str, at: float = 0.0, **fields: object) -> InstanceObservation:
    base = InstanceObservation(name=name, pp=1, requested_at=at, template=T)
    return replace(base, **fields)  # type: ignore[arg-type]


READY = {"head_serving": True, "bytes_verified": True, "ready_at": 5.0}


def test_phase_needs_stage_zero_serving_and_every_byte_verified() -> None:
    assert inst("a").phase == InstancePhase.STARTING
    assert inst("a", head_serving=True).phase == InstancePhase.STARTING
    assert inst("a", bytes_verified=True).phase == InstancePhase.STARTING
    assert inst("a", head_serving=True, bytes_verified=True).phase == InstancePhase.READY
    half_made = inst("a", head_serving=True, bytes_verified=True, missing_stages=(1,))
    assert half_made.phase == InstancePhase.STARTING
    assert inst("a", **READY, failure="boom").phase == InstancePhase.FAILED
    assert inst("a", **READY, draining_since=3.0).phase == InstancePhase.DRAINING
    pending = inst("s", **READY, consolidates="p")
    assert pending.phase == InstancePhase.STARTING and pending.warm
    assert replace(pending, promoted=True).phase == InstancePhase.READY


def test_scale_up_creates_what_is_missing_and_finishes_half_made_instances() -> None:
    d = decide_instances(3, [inst("a", missing_stages=(1,))], T, FailureStatus(), 0.0, POLICY)
    assert d.create == 2 and d.complete == (("a", (1,)),) and not d.delete


def test_scale_down_stops_starting_before_ready_and_newest_first() -> None:
    instances = [inst("old", 1, **READY), inst("new", 2, **READY), inst("cold", 3)]
    d = decide_instances(1, instances, T, FailureStatus(), 10.0, POLICY)
    assert [n for n, _ in d.delete] == ["cold", "new"]


def test_outdated_instances_go_only_once_enough_current_ones_serve() -> None:
    old = inst("old", **READY, template="other")
    d = decide_instances(1, [old, inst("new", 5)], T, FailureStatus(), 10.0, POLICY)
    assert d.delete == () and d.create == 0
    d = decide_instances(1, [old, inst("new", 5, **READY)], T, FailureStatus(), 10.0, POLICY)
    assert d.delete == (("old", "outdated: the spec changed"),)


def test_a_standalone_and_a_draining_pipeline_are_not_replicas() -> None:
    pipeline = inst("p", **READY, draining_since=1.0)
    standalone = inst("s", **READY, consolidates="p", promoted=True)
    d = decide_instances(1, [pipeline, standalone], T, FailureStatus(), 10.0, POLICY)
    assert d.empty
    orphan = inst("s2", consolidates="gone")
    d = decide_instances(0, [orphan], T, FailureStatus(), 10.0, POLICY)
    assert d.delete == (("s2", "its pipeline gone is gone"),)


def test_leftover_pods_without_a_record_are_removed_without_counting() -> None:
    d = decide_instances(1, [inst("x", recorded=False)], T, FailureStatus(), 0.0, POLICY)
    assert d.delete[0][0] == "x" and d.failures.consecutive == 0 and d.create == 1


def test_backoff_doubles_to_its_cap() -> None:
    assert [backoff_delay(k, POLICY) for k in range(6)] == [0, 10, 20, 40, 45, 45]


def test_a_crash_looping_model_backs_off_then_gives_up() -> None:
    """Drive the policy as a backend does: each pass, the instance it created crashes."""
    failures, now, created, waits = FailureStatus(), 0.0, 0, []
    instances: list[InstanceObservation] = []
    last_create = 0.0
    for _ in range(400):
        d = decide_instances(1, instances, T, failures, now, POLICY)
        failures = d.failures
        instances = [i for i in instances if i.name not in {n for n, _ in d.delete}]
        if d.create:
            if created:
                waits.append(round(now - last_create))
            created += 1
            last_create = now
            # It crashes right away; the next pass sees it failed.
            instances.append(inst(f"i{created}", now, failure="exit 1"))
        if d.gave_up:
            break
        now += 1.0
    assert created == POLICY.max_failures
    # Each gap between two starts: one pass to see the crash, then the backoff after that
    # many failures in a row.
    assert waits == [1 + 10, 1 + 20, 1 + 40]
    assert failures.gave_up and failures.consecutive == POLICY.max_failures
    assert d.gave_up is not None and "exit 1" in d.gave_up
    # Given up: nothing more starts however long one waits ...
    assert decide_instances(1, [], T, failures, now + 1e6, POLICY).create == 0
    # ... until the model scales to zero or its spec changes.
    reset = decide_instances(0, [], T, failures, now, POLICY).failures
    assert reset.consecutive == 0 and decide_instances(1, [], T, reset, now, POLICY).create == 1
    assert decide_instances(1, [], "edited", failures, now, POLICY).create == 1


def test_a_ready_instance_resets_the_count() -> None:
    failures = FailureStatus(consecutive=3, retry_at=100.0, template=T)
    d = decide_instances(2, [inst("a", **READY)], T, failures, 50.0, POLICY)
    assert d.failures.consecutive == 0 and d.create == 1


def test_backing_off_says_when_it_retries() -> None:
    d = decide_instances(1, [inst("a", failure="oom")], T, FailureStatus(), 100.0, POLICY)
    assert d.create == 0 and d.retry_in == pytest.approx(10.0)
    assert d.newly_failed == (("a", "oom"),)
    later = decide_instances(1, [], T, d.failures, 110.0, POLICY)
    assert later.create == 1 and later.retry_in is None


def test_a_failed_standalone_is_the_consolidations_not_a_cold_start_failure() -> None:
    standalone = inst("s", consolidates="p", promoted=True, failure="exit 1")
    d = decide_instances(0, [standalone], T, FailureStatus(), 0.0, POLICY)
    assert d.delete and d.failures.consecutive == 0


def test_start_timeout_is_a_failure() -> None:
    assert timed_out(inst("a", 100.0), 159.0, POLICY).failure is None
    assert "not ready 61 s" in (timed_out(inst("a", 100.0), 161.0, POLICY).failure or "")
    assert timed_out(inst("a", 100.0, **READY), 1000.0, POLICY).failure is None
