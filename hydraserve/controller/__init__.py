"""The planner: pipeline size, per-worker memory, placement and bandwidth admission.

Pure code, called by the operator, the embedded platform and the simulator alike.
"""

from hydraserve.controller.config import PlannerConfig
from hydraserve.controller.costmodel import cold_ttft_s, salvageable_wait_s
from hydraserve.controller.planner import plan
from hydraserve.controller.profile import (
    model_key,
    plan_request_for,
    profile_from_manifest,
    replica_bytes,
)
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
    "model_key",
    "plan",
    "plan_request_for",
    "profile_from_manifest",
    "replica_bytes",
    "salvageable_wait_s",
]
