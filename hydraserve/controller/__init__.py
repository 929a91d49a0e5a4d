"""The planner: pipeline size, per-worker memory, placement and bandwidth admission.

Pure code, called by the operator, the embedded platform and the simulator alike.
"""

from hydraserve.controller.config import PlannerConfig
from hydraserve.controller.costmodel import cold_ttft_s
from hydraserve.controller.planner import plan
from hydraserve.controller.profile import profile_from_manifest
from hydraserve.controller.types import (
    SLO,
    ClusterState,
    GPUState,
    InflightFetch,
    ModelProfile,
    NodeState,
    Plan,
    PlanRequest,
    Prediction,
    StagePlacement,
    Unschedulable,
)

__all__ = [
    "SLO",
    "ClusterState",
    "GPUState",
    "InflightFetch",
    "ModelProfile",
    "NodeState",
    "Plan",
    "PlanRequest",
    "PlannerConfig",
    "Prediction",
    "StagePlacement",
    "Unschedulable",
    "cold_ttft_s",
    "plan",
    "profile_from_manifest",
]
