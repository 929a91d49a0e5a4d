"""The user-facing objects: ``ServerlessModel`` spec and status (source of truth for the CRD)."""

from hydraserve.api.models import (
    Condition,
    EngineSpec,
    InstanceOrigin,
    InstancePhase,
    InstanceStatus,
    ModelPhase,
    PipelineSpec,
    ResourcesSpec,
    ScalingSpec,
    ServerlessModel,
    ServerlessModelSpec,
    ServerlessModelStatus,
    SLOSpec,
    SourceSpec,
    StageTiming,
    WorkerStatus,
)

__all__ = [
    "Condition",
    "EngineSpec",
    "InstanceOrigin",
    "InstancePhase",
    "InstanceStatus",
    "ModelPhase",
    "PipelineSpec",
    "ResourcesSpec",
    "SLOSpec",
    "ScalingSpec",
    "ServerlessModel",
    "ServerlessModelSpec",
    "ServerlessModelStatus",
    "SourceSpec",
    "StageTiming",
    "WorkerStatus",
]
