"""The instance lifecycle, decided (pure): which instances to create, finish or delete.

Both backends observe their instances into :class:`InstanceObservation` records (the
operator from Services, pods and the node prefetchers; the local backend from its
processes and the node's shared memory) and apply the :class:`InstanceDecision` this
module returns: the operator with pods and Services, the local backend with processes.
So replica counts, roll-outs, failure backoff and giving up behave the same everywhere.

Failures: an instance that fails is deleted and counted. The next one may start only
``backoff_delay(k)`` seconds after the k-th failure in a row (exponential, capped); after
``max_failures`` in a row nothing new starts and the model is Failed, until the spec
changes (another template), the model scales to zero, or an instance becomes ready.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from pydantic import BaseModel, Field

from hydraserve.api.models import FailureStatus, InstanceOrigin, InstancePhase


@dataclass(frozen=True)
class LifecyclePolicy:
    start_timeout_s: float = 900.0
    backoff_base_s: float = 10.0
    backoff_cap_s: float = 300.0
    max_failures: int = 5


class LifecycleSettings(BaseModel):
    """The lifecycle settings every backend has (the local backend's and the operator's
    settings inherit them, so names, bounds and meaning are defined once)."""

    instance_start_timeout_seconds: float = Field(
        default=LifecyclePolicy.start_timeout_s,
        gt=0,
        description="An instance not ready by then (stage 0 serving, every byte verified) "
        "has failed and is replaced.",
    )
    failure_backoff_seconds: float = Field(
        default=LifecyclePolicy.backoff_base_s,
        ge=0,
        description="Wait after the first failed instance before starting the next; "
        "doubles with each further failure in a row.",
    )
    failure_backoff_max_seconds: float = Field(
        default=LifecyclePolicy.backoff_cap_s, ge=0, description="Cap of that wait."
    )
    max_consecutive_failures: int = Field(
        default=LifecyclePolicy.max_failures,
        ge=1,
        description="After this many failed instances in a row the model is Failed and "
        "nothing starts until its spec changes or it scales to zero.",
    )

    def lifecycle_policy(self) -> LifecyclePolicy:
        return LifecyclePolicy(
            start_timeout_s=self.instance_start_timeout_seconds,
            backoff_base_s=self.failure_backoff_seconds,
            backoff_cap_s=self.failure_backoff_max_seconds,
            max_failures=self.max_consecutive_failures,
        )


def backoff_delay(failures: int, policy: LifecyclePolicy) -> float:
    """Seconds to wait after the ``failures``-th failure in a row before the next start."""
    if failures <= 0:
        return 0.0
    return float(min(policy.backoff_cap_s, policy.backoff_base_s * 2 ** (failures - 1)))


@dataclass(frozen=True)
class InstanceObservation:
    """What a backend observed of one instance, in the backend's neutral terms."""

    name: str
    pp: int
    requested_at: float
    template: str | None = None  # what it was made from; None: unknown (no record)
    recorded: bool = True  # its record exists (a Service; a tracked process group)
    head_serving: bool = False  # stage 0 answers (pod Ready / GET /health)
    bytes_verified: bool = False  # every stage's weights are verified on its node
    missing_stages: tuple[int, ...] = ()  # stages with no worker (a half-made instance)
    failure: str | None = None  # why it cannot become (or stay) ready
    consolidates: str | None = None  # a standalone engine: the pipeline it replaces
    promoted: bool = False  # a standalone that took over its pipeline
    draining_since: float | None = None
    ready_at: float | None = None
    verified_at: float | None = None  # when the last stage's bytes were verified

    @property
    def pending(self) -> bool:
        """A standalone engine not promoted yet: not a replica, its consolidation owns it."""
        return self.consolidates is not None and not self.promoted

    @property
    def warm(self) -> bool:
        """Could serve: stage 0 answers and every byte it may read is verified. (Engines
        may adopt weights before their last byte is verified, decision 0004: a request
        must never run on them before.)"""
        return self.head_serving and self.bytes_verified and not self.missing_stages

    @property
    def origin(self) -> InstanceOrigin:
        return InstanceOrigin.CONSOLIDATION if self.consolidates else InstanceOrigin.COLD_START

    @property
    def phase(self) -> InstancePhase:
        if self.failure is not None:
            return InstancePhase.FAILED
        if self.draining_since is not None:
            return InstancePhase.DRAINING
        if self.warm and not self.pending:
            return InstancePhase.READY
        return InstancePhase.STARTING

    @property
    def live(self) -> bool:
        """Counts as a replica: not failed, not draining, not a pending standalone."""
        return (
            self.recorded
            and self.failure is None
            and self.draining_since is None
            and not self.pending
        )


@dataclass(frozen=True)
class InstanceDecision:
    create: int = 0
    complete: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (instance, missing stages)
    delete: tuple[tuple[str, str], ...] = ()  # (instance, why)
    failures: FailureStatus = field(default_factory=FailureStatus)
    newly_failed: tuple[tuple[str, str], ...] = ()  # (instance, error), counted this pass
    # Seconds until the next instance may start (backing off); None when not waiting.
    retry_in: float | None = None

    @property
    def empty(self) -> bool:
        return not (self.create or self.complete or self.delete)

    @property
    def gave_up(self) -> str | None:
        """Why nothing new starts any more (the model's Failed reason), or None."""
        f = self.failures
        if not f.gave_up:
            return None
        return (
            f"{f.consecutive} instances failed in a row; last: {f.last_instance}: "
            f"{f.last_error}. Fix the cause, then change the spec or scale the model to "
            "zero to try again."
        )


def timed_out(obs: InstanceObservation, now: float, policy: LifecyclePolicy) -> InstanceObservation:
    """The observation with the start timeout applied: an instance that is still not
    ready ``start_timeout_s`` after it was requested has failed."""
    if obs.failure is not None or obs.warm or obs.ready_at is not None or not obs.requested_at:
        return obs
    waited = now - obs.requested_at
    if waited > policy.start_timeout_s:
        return replace(obs, failure=f"not ready {waited:.0f} s after it was requested")
    return obs


def _count_failures(
    previous: FailureStatus,
    failed: Sequence[InstanceObservation],
    template: str,
    desired: int,
    any_ready: bool,
    now: float,
    policy: LifecyclePolicy,
) -> FailureStatus:
    record = previous
    # A reset: the spec changed, the model was scaled to zero, or an instance serves.
    if record.template not in (None, template) or desired == 0 or any_ready:
        record = FailureStatus()
    for obs in failed:
        count = record.consecutive + 1
        record = FailureStatus(
            consecutive=count,
            last_instance=obs.name,
            last_error=obs.failure,
            last_failed_at=now,
            retry_at=now + backoff_delay(count, policy),
            gave_up=count >= policy.max_failures,
            template=template,
        )
    return record


def decide_instances(
    desired: int,
    instances: Sequence[InstanceObservation],
    template: str,
    failures: FailureStatus,
    now: float,
    policy: LifecyclePolicy,
) -> InstanceDecision:
    """What to change so that ``desired`` up-to-date instances exist.

    Failed instances go (and count toward backoff); outdated ones (another template) stay
    until enough up-to-date ones are ready, then go; surplus goes not-ready-first, then
    newest-first. Instances a consolidation owns are not replicas: a draining pipeline
    (released when drained) and a standalone engine not promoted yet (it goes when its
    pipeline does; its own failure is the consolidation's to handle). A record-less
    instance (pods left after their Service was deleted) is removed without counting.
    """
    delete: list[tuple[str, str]] = []
    current: list[InstanceObservation] = []
    outdated: list[InstanceObservation] = []
    pending: list[InstanceObservation] = []
    failed: list[InstanceObservation] = []
    for inst in instances:
        if not inst.recorded:
            delete.append((inst.name, "left over: its record is gone"))
        elif inst.pending:
            pending.append(inst)
        elif inst.failure is not None:
            delete.append((inst.name, f"failed: {inst.failure}"))
            if inst.consolidates is None:
                failed.append(inst)
        elif inst.draining_since is not None:
            continue
        elif inst.template is not None and inst.template != template:
            outdated.append(inst)
        else:
            current.append(inst)

    any_ready = any(i.phase == InstancePhase.READY for i in instances)
    record = _count_failures(failures, failed, template, desired, any_ready, now, policy)

    surplus = len(current) - desired
    if surplus > 0:
        order = sorted(current, key=lambda i: (i.warm, -i.requested_at))
        for inst in order[:surplus]:
            delete.append((inst.name, f"scaled down to {desired}"))
        current = [i for i in current if i not in order[:surplus]]
    ready_current = sum(1 for i in current if i.warm)
    if outdated and (desired == 0 or ready_current >= desired):
        delete += [(i.name, "outdated: the spec changed") for i in outdated]
    going = {name for name, _ in delete}
    pipelines = {i.name for i in instances if i.recorded and i.name not in going}
    for inst in pending:
        if inst.consolidates not in pipelines:
            delete.append((inst.name, f"its pipeline {inst.consolidates} is gone"))

    complete = tuple((i.name, i.missing_stages) for i in current if i.missing_stages)
    wanted = max(0, desired - len(current))
    retry_in: float | None = None
    if wanted and record.gave_up:
        wanted = 0
    elif wanted and record.retry_at is not None and now < record.retry_at:
        retry_in = record.retry_at - now
        wanted = 0
    return InstanceDecision(
        create=wanted,
        complete=complete,
        delete=tuple(delete),
        failures=record,
        newly_failed=tuple((i.name, i.failure or "") for i in failed),
        retry_in=retry_in,
    )
