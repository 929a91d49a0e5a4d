"""The interface between the gateway and whatever runs model instances.

The gateway only ever (1) reads model views (which models exist, which instances are
ready and where), (2) asks for a replica count, and (3) waits for a model's view to
change. The embedded platform implements it with local processes; the Kubernetes backend
with ServerlessModel resources (scale subresource + status written by the operator).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

# InstancePhase and InstanceOrigin are the API's (status.instances[].phase/origin), so the
# embedded platform and Kubernetes report instances in the same words.
from hydraserve.api.models import (
    ColdStartPrediction,
    Condition,
    ConsolidationStatus,
    InstanceOrigin,
    InstancePhase,
    InstanceStatus,
    ModelPhase,
    ServerlessModel,
    SloAttainmentStatus,
    StageTiming,
)
from hydraserve.api.validation import desired_replicas

__all__ = [
    "ClusterBackend",
    "InstanceOrigin",
    "InstancePhase",
    "InstanceView",
    "ModelView",
    "view_of",
]


@dataclass(frozen=True)
class InstanceView:
    name: str
    model: str
    pp: int
    phase: InstancePhase
    endpoint: str | None = None  # base URL of the OpenAI server, e.g. http://10.0.0.5:8100
    started_at: float = 0.0  # wall clock, when the instance was requested
    ready_at: float | None = None
    error: str | None = None
    cold_start: tuple[StageTiming, ...] = ()
    origin: InstanceOrigin = InstanceOrigin.COLD_START
    # Where the instance's stage 0 runs, and whether its engine saves and loads KV caches
    # through the node's shared memory (HydraServe's KV connector): together they say
    # whether a request can move between two instances by KV transfer.
    node: str | None = None
    kv_transfer: bool = False
    prediction: ColdStartPrediction | None = None  # the planner's, for this cold start


def qualified_id(namespace: str, name: str) -> str:
    """A model's canonical id across namespaces, ``<namespace>/<name>`` (decision 0502)."""
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class ModelView:
    model: ServerlessModel
    desired_replicas: int = 0
    instances: tuple[InstanceView, ...] = ()
    error: str | None = field(
        default=None,
        metadata={"doc": "Why the model cannot start at all (e.g. missing from the store)."},
    )
    # The model's phase as the control plane sees it (Cold, Starting, Serving,
    # Consolidating, Failed); None when the backend does not say (derive it instead).
    phase: ModelPhase | None = None
    # Finished consolidations, oldest first (a bounded history; metrics read it once each).
    consolidations: tuple[ConsolidationStatus, ...] = ()
    # KV cache bytes one token occupies (all layers, K and V): the migration cost model's
    # input; None when unknown (then requests move by recompute only).
    kv_bytes_per_token: int | None = None
    # The model's status conditions (why it is not serving, when it is not).
    conditions: tuple[Condition, ...] = ()

    @property
    def name(self) -> str:
        return self.model.metadata.name

    @property
    def ready_instances(self) -> tuple[InstanceView, ...]:
        return tuple(i for i in self.instances if i.phase == InstancePhase.READY and i.endpoint)

    @property
    def effective_phase(self) -> ModelPhase:
        """``phase`` when the backend gave one, else derived from the instances."""
        if self.phase is not None:
            return self.phase
        if self.error is not None and not self.ready_instances:
            return ModelPhase.FAILED
        if self.ready_instances:
            return ModelPhase.SERVING
        if self.desired_replicas > 0 or self.instances:
            return ModelPhase.STARTING
        return ModelPhase.COLD


def instance_view(model: str, inst: InstanceStatus) -> InstanceView:
    """One instance of a model's status as the gateway sees it. ``ready`` wins: a status
    written before ``phase`` existed reads as Starting, with ``ready`` saying what it was."""
    phase = inst.phase
    if inst.ready:
        phase = InstancePhase.READY
    elif phase == InstancePhase.READY:
        phase = InstancePhase.STARTING
    return InstanceView(
        name=inst.name,
        model=model,
        pp=inst.pp,
        phase=phase,
        endpoint=inst.endpoint,
        started_at=inst.requested_at or 0.0,
        ready_at=inst.ready_at,
        error=inst.error,
        cold_start=tuple(inst.cold_start),
        origin=inst.origin,
        node=next((w.node for w in inst.workers if w.stage == 0), None),
        kv_transfer=inst.kv_transfer,
        prediction=inst.prediction,
    )


def view_of(
    model: ServerlessModel,
    *,
    spec_error: str | None = None,
    phase_written: bool = True,
    kv_bytes_per_token: int | None = None,
) -> ModelView:
    """A model and its status (``model.status``) as the gateway sees it: the one
    derivation both backends use. ``spec_error``: the spec is invalid (the model stays
    listed, with that error, so a request gets a useful answer)."""
    status = model.status
    error = spec_error
    if error is None and status.phase == ModelPhase.FAILED:
        failing = [c for c in status.conditions if c.status == "False" and c.message]
        error = failing[-1].message if failing else "the model failed"
    return ModelView(
        model=model,
        desired_replicas=desired_replicas(model.spec) if spec_error is None else 0,
        instances=tuple(instance_view(model.name, i) for i in status.instances),
        error=error,
        phase=status.phase if phase_written else None,
        consolidations=tuple(status.consolidations),
        kv_bytes_per_token=kv_bytes_per_token,
        conditions=tuple(status.conditions),
    )


class ClusterBackend(ABC):
    """What the gateway needs from the control plane."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start background work (watches, reconcilers)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work and release what the backend started."""

    @abstractmethod
    def list_models(self) -> list[ModelView]: ...

    @abstractmethod
    def get_model(self, name: str) -> ModelView | None: ...

    @abstractmethod
    async def scale(self, name: str, replicas: int) -> None:
        """Ask for ``replicas`` instances of a model (the autoscaler's decision)."""

    @abstractmethod
    async def wait_for_change(self, name: str, timeout: float) -> None:
        """Return when the model's view changes, or after ``timeout`` seconds."""

    async def report_slo_attainment(  # noqa: B027 - optional hook
        self, name: str, attainment: SloAttainmentStatus
    ) -> None:
        """Keep the gateway's SLO attainment in the model's status (``sloAttainment``)."""
