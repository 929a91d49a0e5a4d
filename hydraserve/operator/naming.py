"""Names, labels and annotations the operator puts on what it creates.

An *instance* is one replica of a model: a headless Service (its record, carrying the
placement plan as an annotation, and the stable address of its head) plus one worker pod
per pipeline stage. Everything the operator needs after a restart is on these objects.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from typing import Any

from hydraserve.api.models import GROUP, ServerlessModelSpec

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY_VALUE = "hydraserve-operator"
APP_NAME = "app.kubernetes.io/name"
WORKER_APP = "hydraserve-worker"
MODEL_LABEL = f"{GROUP}/model"
INSTANCE_LABEL = f"{GROUP}/instance"
STAGE_LABEL = f"{GROUP}/stage"

PLAN_ANNOTATION = f"{GROUP}/plan"
TEMPLATE_HASH_ANNOTATION = f"{GROUP}/template-hash"
REQUESTED_AT_ANNOTATION = f"{GROUP}/requested-at"
PLANNED_AT_ANNOTATION = f"{GROUP}/planned-at"
PRELOADED_AT_ANNOTATION = f"{GROUP}/preloaded-at"
# When the node prefetchers had verified every byte of every stage (written once seen, so
# readiness survives a prefetcher restart that forgets its fetches).
VERIFIED_AT_ANNOTATION = f"{GROUP}/verified-at"
NODE_ANNOTATION = f"{GROUP}/node"
GPU_ANNOTATION = f"{GROUP}/gpu"
MEMORY_ANNOTATION = f"{GROUP}/gpu-memory-bytes"
FINALIZER = f"{GROUP}/cleanup"

# Consolidation (decision 0402). A standalone engine's Service and pod carry
# CONSOLIDATES_LABEL=<pipeline>: outside the replica count until it is promoted. The
# pipeline's Service records the switch (DRAINING_SINCE, with FETCHED_AT: when the node
# verified the whole model), the drain (IDLE_SINCE) and a
# given-up consolidation (ABANDONED); the standalone's Service its promotion.
CONSOLIDATES_LABEL = f"{GROUP}/consolidates"
DRAINING_SINCE_ANNOTATION = f"{GROUP}/draining-since"
IDLE_SINCE_ANNOTATION = f"{GROUP}/idle-since"
FETCHED_AT_ANNOTATION = f"{GROUP}/fetched-at"
ABANDONED_ANNOTATION = f"{GROUP}/consolidation-abandoned"
PROMOTED_AT_ANNOTATION = f"{GROUP}/promoted-at"
# The instance's engines save and load KV caches through their node's shared memory, so a
# request can move between two instances on one node by KV transfer (decision 0400).
KV_TRANSFER_ANNOTATION = f"{GROUP}/kv-transfer"

# Node labels/annotations the planner's cluster view is read from.
NIC_GBPS_KEY = f"{GROUP}/nic-gbps"
GPU_TYPE_KEY = f"{GROUP}/gpu-type"
GPU_MEMORY_GIB_KEY = f"{GROUP}/gpu-memory-gib"
GPU_COUNT_KEY = f"{GROUP}/gpu-count"

_ALPHABET = string.ascii_lowercase + string.digits
_MAX_LABEL = 63


def worker_labels(
    model: str, instance: str | None = None, rank: int | None = None
) -> dict[str, str]:
    labels = {MANAGED_BY: MANAGED_BY_VALUE, APP_NAME: WORKER_APP, MODEL_LABEL: model}
    if instance is not None:
        labels[INSTANCE_LABEL] = instance
    if rank is not None:
        labels[STAGE_LABEL] = str(rank)
    return labels


def head_selector(model: str) -> str:
    """The scale subresource's label selector: the instances' head pods."""
    return f"{INSTANCE_LABEL},{MODEL_LABEL}={model},{STAGE_LABEL}=0"


def new_instance_name(model: str, suffix: str | None = None) -> str:
    """``<model>-<5 random chars>``, a DNS-1035 label (Service names must start with a letter)."""
    suffix = suffix or "".join(secrets.choice(_ALPHABET) for _ in range(5))
    base = model if model[:1].isalpha() else f"m-{model}"
    base = base[: _MAX_LABEL - len(suffix) - 1].rstrip("-")
    return f"{base}-{suffix}"


def standalone_name(pipeline: str) -> str:
    """The standalone engine that consolidates ``pipeline``: one name per pipeline, so a
    restarted operator finds (or fails to create twice) the one it started."""
    return f"{pipeline[: _MAX_LABEL - 2].rstrip('-')}-c"


def pod_name(instance: str, rank: int) -> str:
    return f"{instance}-{rank}"


def is_dns_label(name: str) -> bool:
    return len(name) <= _MAX_LABEL and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) is not None


def template_hash(spec: ServerlessModelSpec, worker_image: str) -> str:
    """Hash of what shapes the worker pods; instances with another hash are outdated.

    Scaling, SLOs and replicas are left out: changing them must not restart instances.
    """
    shape: dict[str, Any] = {
        "source": spec.source.model_dump(mode="json"),
        "resources": spec.resources.model_dump(mode="json"),
        "engine": spec.engine.model_dump(mode="json"),
        "image": spec.engine.image or worker_image,
    }
    digest = hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()
    return digest[:16]


# Volumes (decision 0500): a worker sees its node's copy of its model through a
# PersistentVolumeClaim bound to a PersistentVolume of that one directory, read-only, and
# its instance's KV area through another, never the node's whole shared memory.
VOLUME_LABEL = f"{GROUP}/volume"  # "model" or "kv"
VOLUME_NAMESPACE_LABEL = f"{GROUP}/namespace"  # on PersistentVolumes (cluster-scoped)
KV_AREA_LABEL = f"{GROUP}/kv-area"  # on pods that mount an instance's KV area
NODE_LABEL = f"{GROUP}/node"
VOLUME_STORAGE_CLASS = "hydraserve-node-memory"  # no provisioner: bound by the operator


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def model_claim_name(uri: str, revision: str, node: str) -> str:
    """One claim per (model revision, node) in the model's namespace."""
    return f"hs-model-{_digest(uri, revision, node)}"


def kv_area_name(namespace: str, pipeline: str) -> str:
    """The node directory of an instance's KV area (namespaced: instance names are not
    unique across namespaces)."""
    return f"{namespace}.{pipeline}"


def kv_claim_name(pipeline: str) -> str:
    return f"hs-kv-{pipeline}"


def volume_name(namespace: str, claim: str) -> str:
    """The PersistentVolume bound to one claim (cluster-scoped: namespaced by a digest)."""
    return f"hs-{_digest(namespace, claim)}"
