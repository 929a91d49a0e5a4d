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
    InstanceOrigin,
    InstancePhase,
    ModelPhase,
    ServerlessModel,
    StageTiming,
)

__all__ = [
    "ClusterBackend",
    "ConsolidationRecord",
    "InstanceOrigin",
    "InstancePhase",
    "InstanceView",
    "ModelView",
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


@dataclass(frozen=True)
class ConsolidationRecord:
    """One finished (or abandoned) consolidation of a pipeline into a standalone engine.

    Times are wall-clock seconds; ``None`` where the step did not happen."""

    model: str
    pipeline: str
    standalone: str
    started_at: float  # the pipeline became ready; the background fetch began
    fetched_at: float | None  # the whole model was verified in the node's shared memory
    promoted_at: float | None  # the standalone took over; the pipeline began draining
    released_at: float | None  # the pipeline's stage processes were stopped
    outcome: str = "done"  # "done" | "abandoned"
    reason: str = ""

    @property
    def seconds(self) -> float | None:
        end = self.released_at if self.outcome == "done" else None
        return None if end is None else max(0.0, end - self.started_at)


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
    consolidations: tuple[ConsolidationRecord, ...] = ()
    # KV cache bytes one token occupies (all layers, K and V): the migration cost model's
    # input; None when unknown (then requests move by recompute only).
    kv_bytes_per_token: int | None = None

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
