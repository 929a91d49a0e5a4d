"""One model instance as local processes, and what the policies see of it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

from hydraserve.api.models import InstanceStatus, StageTiming, WorkerStatus
from hydraserve.backends.local.processes import StageProcess
from hydraserve.control.consolidation import no_consolidation_condition
from hydraserve.control.instances import InstanceObservation
from hydraserve.control.placement import InstancePlan


@dataclass
class Consolidation:
    """A pipeline's consolidation as this backend carries it out."""

    started_at: float
    standalone: str | None = None
    fetched_at: float | None = None
    promoted_at: float | None = None
    in_flight: int | None = None
    idle_since: float | None = None
    abandoned: bool = False
    error: str | None = None


@dataclass
class LocalInstance:
    name: str
    model: str
    plan: InstancePlan
    requested_at: float
    dir: Path
    host: str  # stage 0's address
    port: int  # stage 0's HTTP port
    kv_transfer: bool = False
    replaces: str | None = None  # a standalone: the pipeline it consolidates
    stages: list[StageProcess] = field(default_factory=list)
    # Observed (latched: once true, true until a stage exits).
    head_serving: bool = False
    bytes_verified: bool = False
    verified_at: float | None = None
    healthy_at: float | None = None  # when stage 0 first answered /health
    ready_at: float | None = None
    failure: str | None = None
    cold_start: tuple[StageTiming, ...] = ()
    # A standalone: warmed up (its first-call paths ran) and whether it took over.
    warmup: asyncio.Task[float | None] | None = None
    promoted: bool = False
    draining_since: float | None = None
    consolidation: Consolidation | None = None  # a pipeline: its consolidation

    @property
    def pp(self) -> int:
        return self.plan.pp

    @property
    def node(self) -> str:
        return self.plan.stage(0).node

    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.port}"

    def observation(self) -> InstanceObservation:
        # A standalone counts as serving only after its warm-up: the requests that move
        # to it must not pay its first-call paths.
        warmed = self.replaces is None or (self.warmup is not None and self.warmup.done())
        return InstanceObservation(
            name=self.name,
            pp=self.pp,
            requested_at=self.requested_at,
            head_serving=self.head_serving and warmed,
            bytes_verified=self.bytes_verified,
            failure=self.failure,
            consolidates=self.replaces,
            promoted=self.promoted,
            draining_since=self.draining_since,
            ready_at=self.ready_at,
            verified_at=self.verified_at,
        )

    def detail(self) -> InstanceStatus:
        workers = [
            WorkerStatus(
                pod=f"{self.name}/stage{s.rank}",
                node=self.plan.stage(s.rank).node,
                stage=s.rank,
                layers=self.plan.stage(s.rank).layers,
                ready=s.exited() is None and (s.rank > 0 or self.head_serving),
            )
            for s in self.stages
        ]
        return InstanceStatus(
            name=self.name,
            pp=self.pp,
            tp=self.plan.tp,
            workers=workers,
            endpoint=self.endpoint,
            cold_start=list(self.cold_start),
            kv_transfer=self.kv_transfer,
            prediction=self.plan.prediction(),
            consolidation=no_consolidation_condition(self.plan),
        )
