"""The planner: pipeline size, per-worker memory, placement and bandwidth admission.

Pure code, called by the operator, the embedded platform and the simulator alike.
"""

from hydraserve.planner.config import PlannerConfig
from hydraserve.planner.costmodel import cold_ttft_s, salvageable_wait_s
from hydraserve.planner.profile import (
    model_key,
    plan_request_for,
    profile_from_manifest,
    replica_bytes,
)
from hydraserve.planner.search import plan
from hydraserve.planner.types import (
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
