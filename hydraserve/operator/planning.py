"""The operator's use of the planner: a plan request from a spec and its manifest.

The operator calls the same pure planner as the embedded platform and the simulator; the
planner is injectable (``Planner``) so tests can force a placement.
"""

from __future__ import annotations

from collections.abc import Callable

from hydraserve.api.models import ServerlessModelSpec
from hydraserve.planner import PlannerConfig, plan
from hydraserve.planner.profile import (
    model_key,
    plan_request_for,
    profile_from_manifest,
    replica_bytes,
)
from hydraserve.planner.types import ClusterState, Plan, PlanRequest, Unschedulable
from hydraserve.store import Manifest

Planner = Callable[[PlanRequest, ClusterState], Plan | Unschedulable]


def plan_request(spec: ServerlessModelSpec, manifest: Manifest) -> PlanRequest:
    """Raises ValueError when the spec's replica memory cannot even hold the weights."""
    profile = profile_from_manifest(manifest, replica_bytes(spec), model_key(spec))
    return plan_request_for(spec, profile)


def planner_for(config: PlannerConfig) -> Planner:
    """The planner with the operator's cost-model constants (``settings.planner``)."""

    def plan_instance(request: PlanRequest, cluster: ClusterState) -> Plan | Unschedulable:
        return plan(request, cluster, config)

    return plan_instance
