"""Condition types and the reasons of conditions and events, named once.

Both backends write these words (status conditions on Kubernetes and in the local
backend's model status; Kubernetes Events and structured log lines), so a user reads the
same reason wherever the model runs.
"""

from __future__ import annotations

from typing import Final

# Condition types (status.conditions[].type).
VALID: Final = "Valid"
SCHEDULED: Final = "Scheduled"
READY: Final = "Ready"

# Valid.
SPEC_VALID: Final = "SpecValid"
INVALID_SPEC: Final = "InvalidSpec"
MODEL_NOT_FOUND: Final = "ModelNotFound"
POLICY_VIOLATION: Final = "PolicyViolation"

# Scheduled.
PLACED: Final = "Placed"
UNSCHEDULABLE: Final = "Unschedulable"

# Ready.
SERVING: Final = "Serving"
STARTING: Final = "Starting"
SCALED_TO_ZERO: Final = "ScaledToZero"
BACK_OFF: Final = "BackOff"
INSTANCES_FAILING: Final = "InstancesFailing"

# Events (Kubernetes Events and log lines) about instances.
INSTANCE_PLANNED: Final = "InstancePlanned"
INSTANCE_DELETED: Final = "InstanceDeleted"
INSTANCE_FAILED: Final = "InstanceFailed"

# Events about consolidation (decision 0402).
CONSOLIDATION_STARTED: Final = "ConsolidationStarted"
CONSOLIDATION_PROMOTED: Final = "ConsolidationPromoted"
CONSOLIDATION_DONE: Final = "ConsolidationDone"
CONSOLIDATION_ABANDONED: Final = "ConsolidationAbandoned"

# A pipeline that will not be consolidated (status.instances[].consolidation, type
# CONSOLIDATION): no node had the GPUs free for a whole replica when it was planned.
CONSOLIDATION: Final = "Consolidation"
NO_CONSOLIDATION_TARGET: Final = "NoConsolidationTarget"

# Event types.
NORMAL: Final = "Normal"
WARNING: Final = "Warning"
