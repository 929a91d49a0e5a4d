"""The interface between the gateway and whatever runs model instances.

The gateway only ever (1) reads model views (which models exist, which instances are
ready and where), (2) asks for a replica count, and (3) waits for a model's view to
change. The embedded platform implements it with local processes; the Kubernetes backend
with ServerlessModel resources (scale subresource + status written by the operator).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum

from hydraserve.api.models import ServerlessModel, StageTiming


class InstancePhase(StrEnum):
    STARTING = "Starting"
    READY = "Ready"
    DRAINING = "Draining"  # taking no new requests (replaced or scaling down)
    FAILED = "Failed"


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


@dataclass(frozen=True)
class ModelView:
    model: ServerlessModel
    desired_replicas: int = 0
    instances: tuple[InstanceView, ...] = ()
    error: str | None = field(
        default=None,
        metadata={"doc": "Why the model cannot start at all (e.g. missing from the store)."},
    )

    @property
    def name(self) -> str:
        return self.model.metadata.name

    @property
    def ready_instances(self) -> tuple[InstanceView, ...]:
        return tuple(i for i in self.instances if i.phase == InstancePhase.READY and i.endpoint)


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
