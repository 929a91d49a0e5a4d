"""Desired Kubernetes objects of one instance: its head Service and a pod per stage.

Pure functions: (model, plan, settings) -> manifest dicts. The Service is created first and
is the instance's record (the plan is on it), so a restarted operator can finish a
half-created instance instead of starting another.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePosixPath
from typing import Any

from hydraserve.api.models import API_VERSION, KIND, ServerlessModelSpec
from hydraserve.control.placement import InstancePlan, kv_hand_over
from hydraserve.operator.cluster_state import gpu_annotation, gpu_resource_amount
from hydraserve.operator.naming import (
    CONSOLIDATES_LABEL,
    GPU_ANNOTATION,
    INSTANCE_LABEL,
    KV_AREA_LABEL,
    KV_TRANSFER_ANNOTATION,
    MANAGED_BY,
    MANAGED_BY_VALUE,
    MEMORY_ANNOTATION,
    MODEL_LABEL,
    NODE_ANNOTATION,
    NODE_LABEL,
    PLAN_ANNOTATION,
    PLANNED_AT_ANNOTATION,
    PRELOADED_AT_ANNOTATION,
    REQUESTED_AT_ANNOTATION,
    STAGE_LABEL,
    TEMPLATE_HASH_ANNOTATION,
    VOLUME_LABEL,
    VOLUME_NAMESPACE_LABEL,
    VOLUME_STORAGE_CLASS,
    kv_claim_name,
    model_claim_name,
    pod_name,
    standalone_name,
    volume_name,
    worker_labels,
)
from hydraserve.operator.settings import OperatorSettings
from hydraserve.prefetcher.shm import kv_area_dir, model_key

HEALTH_PATH = "/health"
# Where a worker finds the node's models (each mounted at its own directory below).
WORKER_SHM_DIR = PurePosixPath("/dev/shm/hydraserve")
PROBE_PERIOD_S = 2


def owner_reference(model: Mapping[str, Any]) -> dict[str, Any]:
    meta = model.get("metadata") or {}
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": meta.get("name"),
        "uid": meta.get("uid"),
        "controller": True,
        "blockOwnerDeletion": True,
    }


def head_host(instance: str, namespace: str, settings: OperatorSettings) -> str:
    return f"{instance}.{namespace}.svc.{settings.cluster_domain}"


def endpoint_url(instance: str, namespace: str, settings: OperatorSettings) -> str:
    return f"http://{head_host(instance, namespace, settings)}:{settings.worker_port}"


def instance_service(
    model: Mapping[str, Any],
    instance: str,
    plan: InstancePlan,
    template: str,
    requested_at: float,
    planned_at: float,
    settings: OperatorSettings,
) -> dict[str, Any]:
    """Headless, and published before readiness: the stages rendezvous with stage 0 through
    it (TCP store on the master port, then gloo/ZMQ on pod IPs) before stage 0 is ready."""
    meta = model["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": instance,
            "namespace": meta["namespace"],
            "labels": worker_labels(meta["name"], instance),
            "annotations": {
                PLAN_ANNOTATION: plan.model_dump_json(),
                TEMPLATE_HASH_ANNOTATION: template,
                REQUESTED_AT_ANNOTATION: f"{requested_at:.3f}",
                PLANNED_AT_ANNOTATION: f"{planned_at:.3f}",
                KV_TRANSFER_ANNOTATION: str(kv_hand_over(plan, settings.kv_transfer)).lower(),
            },
            "ownerReferences": [owner_reference(model)],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {INSTANCE_LABEL: instance, STAGE_LABEL: "0"},
            "ports": [
                {"name": "http", "port": settings.worker_port, "targetPort": "http"},
                {"name": "rendezvous", "port": settings.master_port, "targetPort": "rendezvous"},
            ],
        },
    }


def worker_args(
    name: str,
    spec: ServerlessModelSpec,
    instance: str,
    namespace: str,
    plan: InstancePlan,
    rank: int,
    prefetcher_url: str | None,
    settings: OperatorSettings,
    kv_area: str | None = None,
) -> list[str]:
    args = [
        "worker",
        f"--name={name}",
        f"--uri={spec.source.uri}",
        f"--revision={spec.source.revision}",
        f"--instance={instance}",
        f"--pp={plan.pp}",
        f"--rank={rank}",
        "--host=0.0.0.0",
        f"--port={settings.worker_port}",
    ]
    if (tp := plan.stage(rank).tp) > 1:
        args.append(f"--tp={tp}")  # ranks of vLLM's tensor parallelism, in this one pod
    if plan.pp > 1:
        args += [
            f"--master-addr={head_host(instance, namespace, settings)}",
            f"--master-port={settings.master_port}",
        ]
    if prefetcher_url:
        args.append(f"--prefetcher={prefetcher_url}")
    if settings.worker_compiled:
        args.append("--compiled")
    if kv_area is not None:
        args += ["--kv-transfer", f"--block-size={settings.kv_block_size}", f"--kv-area={kv_area}"]
    # `--engine-arg=VALUE` keeps values that start with `--` from reading as options.
    args += [f"--engine-arg={arg}" for arg in spec.engine.args]
    return args


def _probes(settings: OperatorSettings) -> dict[str, Any]:
    """Stage 0's /health answers only once the engine is loaded and serving."""
    http_get = {"path": HEALTH_PATH, "port": "http"}
    start_failures = max(1, int(settings.instance_start_timeout_seconds // PROBE_PERIOD_S))
    return {
        "startupProbe": {
            "httpGet": http_get,
            "periodSeconds": PROBE_PERIOD_S,
            "failureThreshold": start_failures,
        },
        "readinessProbe": {"httpGet": http_get, "periodSeconds": PROBE_PERIOD_S},
        "livenessProbe": {"httpGet": http_get, "periodSeconds": 10, "failureThreshold": 6},
    }


def worker_pod(
    model: Mapping[str, Any],
    spec: ServerlessModelSpec,
    instance: str,
    plan: InstancePlan,
    rank: int,
    template: str,
    prefetcher_url: str | None,
    preloaded_at: float | None,
    settings: OperatorSettings,
    kv_area: str | None = None,
) -> dict[str, Any]:
    """One stage's pod. It sees the node's copy of its model read-only through the
    (model, node) claim, and ``kv_area`` (an instance's KV hand-over area, see
    :func:`kv_area_name`) read-write through the instance's claim: never the node's
    whole shared memory, and nothing another tenant could read or change."""
    meta = model["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    stage = plan.stage(rank)
    # All tp ranks of a stage run in this one pod, so on one node: it requests tp devices.
    amount = gpu_resource_amount(stage.memory_bytes, settings, stage.tp)
    gpu = {settings.gpu_resource_name: str(amount)}
    env: list[dict[str, Any]] = [
        # vLLM binds and advertises this address to the other stages.
        {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "GLOO_SOCKET_IFNAME", "value": settings.gloo_socket_ifname},
        {"name": "HYDRASERVE_LOG_JSON", "value": "true"},
        {"name": "HYDRASERVE_SHM_DIR", "value": str(WORKER_SHM_DIR)},
        {"name": "HYDRASERVE_INSTANCE", "value": instance},
        {"name": "HYDRASERVE_STAGE", "value": str(rank)},
    ]
    if settings.s3_endpoint_url:
        env.append({"name": "HYDRASERVE_S3__ENDPOINT_URL", "value": settings.s3_endpoint_url})
    env += [{"name": k, "value": v} for k, v in sorted(settings.worker_extra_env.items())]
    ports = [{"name": "rendezvous", "containerPort": settings.master_port}]
    if rank == 0:
        ports.insert(0, {"name": "http", "containerPort": settings.worker_port})
    model_dir = WORKER_SHM_DIR / model_key(spec.source.uri, spec.source.revision)
    mounts: list[dict[str, Any]] = [
        # The engine's own shared memory (vLLM's message queues), private to the pod.
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "model", "mountPath": str(model_dir), "readOnly": True},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.worker_dshm_size}},
        {
            "name": "model",
            "persistentVolumeClaim": {
                "claimName": model_claim_name(spec.source.uri, spec.source.revision, stage.node),
                "readOnly": True,
            },
        },
    ]
    if kv_area is not None:
        mounts.append({"name": "kv", "mountPath": str(kv_area_dir(WORKER_SHM_DIR, kv_area))})
        volumes.append({"name": "kv", "persistentVolumeClaim": {"claimName": kv_claim_of(kv_area)}})
    container: dict[str, Any] = {
        "name": "worker",
        "image": spec.engine.image or settings.worker_image,
        "imagePullPolicy": settings.worker_image_pull_policy,
        "command": ["hydraserve"],
        "args": worker_args(
            name, spec, instance, namespace, plan, rank, prefetcher_url, settings, kv_area
        ),
        "env": env,
        "ports": ports,
        "resources": {
            "requests": {"cpu": settings.worker_cpu, "memory": settings.worker_memory, **gpu},
            "limits": {"memory": settings.worker_memory, **gpu},
        },
        "volumeMounts": mounts,
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if settings.s3_credentials_secret:
        container["envFrom"] = [
            {"secretRef": {"name": settings.s3_credentials_secret, "optional": True}}
        ]
    if rank == 0:
        container.update(_probes(settings))
    pod_security: dict[str, Any] = {"seccompProfile": {"type": "RuntimeDefault"}}
    if settings.worker_run_as_user is not None:
        pod_security.update(
            runAsNonRoot=True,
            runAsUser=settings.worker_run_as_user,
            runAsGroup=settings.worker_run_as_user,
        )
    annotations = {
        TEMPLATE_HASH_ANNOTATION: template,
        NODE_ANNOTATION: stage.node,
        GPU_ANNOTATION: gpu_annotation(stage.devices),
        MEMORY_ANNOTATION: str(stage.memory_bytes),
        PLAN_ANNOTATION: json.dumps(stage.model_dump()),
    }
    if preloaded_at is not None:
        annotations[PRELOADED_AT_ANNOTATION] = f"{preloaded_at:.3f}"
    pod_spec: dict[str, Any] = {
        # The planner chose the node; the scheduler still admits the pod (device plugins,
        # GPU-sharing extenders) but may only put it there.
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchFields": [
                                {"key": "metadata.name", "operator": "In", "values": [stage.node]}
                            ]
                        }
                    ]
                }
            }
        },
        "tolerations": list(settings.worker_tolerations),
        # A pipeline cannot survive one stage restarting: a failed stage fails the instance,
        # which the operator replaces.
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "securityContext": pod_security,
        "containers": [container],
        "volumes": volumes,
    }
    if settings.worker_service_account:
        pod_spec["serviceAccountName"] = settings.worker_service_account
    if settings.worker_priority_class:
        pod_spec["priorityClassName"] = settings.worker_priority_class
    if settings.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in settings.image_pull_secrets]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod_name(instance, rank),
            "namespace": namespace,
            "labels": worker_labels(name, instance, rank)
            | ({KV_AREA_LABEL: kv_area} if kv_area is not None else {}),
            "annotations": annotations,
            "ownerReferences": [owner_reference(model)],
        },
        "spec": pod_spec,
    }


def standalone_objects(
    model: Mapping[str, Any],
    spec: ServerlessModelSpec,
    pipeline: str,
    plan: InstancePlan,
    template: str,
    prefetcher_url: str | None,
    now: float,
    settings: OperatorSettings,
    kv_area: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The standalone engine that consolidates ``pipeline``: its record (Service) and its
    pp = 1 worker pod, pinned to the all-card node with the same shared-memory volume
    (eager unless ``consolidation_enforce_eager`` is off: its start is on the clock).
    ``plan`` is the standalone's own (``consolidation.standalone_plan``). Both carry
    ``hydraserve.io/consolidates``: the replica count ignores them until promotion."""
    instance = standalone_name(pipeline)
    service = instance_service(model, instance, plan, template, now, now, settings)
    pod = worker_pod(
        model, spec, instance, plan, 0, template, prefetcher_url, None, settings, kv_area
    )
    if settings.consolidation_enforce_eager:
        container = pod["spec"]["containers"][0]
        container["args"] = [a for a in container["args"] if a != "--compiled"]
    for obj in (service, pod):
        obj["metadata"]["labels"][CONSOLIDATES_LABEL] = pipeline
    return service, pod


def kv_claim_of(area: str) -> str:
    """The claim of a KV area named by :func:`kv_area_name` (``<namespace>.<pipeline>``)."""
    return kv_claim_name(area.split(".", 1)[1])


def _volume_pair(
    model: Mapping[str, Any],
    claim: str,
    node: str,
    node_path: str,
    size_bytes: int,
    kind: str,
    read_only: bool,
    settings: OperatorSettings,
    extra_labels: Mapping[str, str],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A PersistentVolume of one node directory, pre-bound to one claim in the model's
    namespace (``claimRef``: no other claim can take it), and that claim."""
    meta = model["metadata"]
    namespace = meta["namespace"]
    labels = {MANAGED_BY: MANAGED_BY_VALUE, MODEL_LABEL: meta["name"], VOLUME_LABEL: kind}
    labels |= dict(extra_labels)
    access = "ReadOnlyMany" if read_only else "ReadWriteOnce"
    storage = str(max(size_bytes, 1 << 20))
    volume = volume_name(namespace, claim)
    pv = {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": volume,
            "labels": labels | {VOLUME_NAMESPACE_LABEL: namespace, NODE_LABEL: node},
        },
        "spec": {
            "capacity": {"storage": storage},
            "accessModes": [access],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": VOLUME_STORAGE_CLASS,
            "volumeMode": "Filesystem",
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                         "namespace": namespace, "name": claim},
            "local": {"path": node_path},
            "nodeAffinity": {
                "required": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [
                            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
                        ]}
                    ]
                }
            },
        },
    }  # fmt: skip
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": claim,
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner_reference(model)],
        },
        "spec": {
            "accessModes": [access],
            "storageClassName": VOLUME_STORAGE_CLASS,
            "volumeName": volume,
            "resources": {"requests": {"storage": storage}},
        },
    }
    return pv, pvc


def model_volume(
    model: Mapping[str, Any],
    spec: ServerlessModelSpec,
    node: str,
    size_bytes: int,
    settings: OperatorSettings,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The node's copy of one model revision, for the model's namespace, read-only."""
    key = model_key(spec.source.uri, spec.source.revision)
    claim = model_claim_name(spec.source.uri, spec.source.revision, node)
    path = f"{settings.node_shm_dir}/{key}"
    return _volume_pair(model, claim, node, path, size_bytes, "model", True, settings, {})


def kv_volume(
    model: Mapping[str, Any], area: str, node: str, settings: OperatorSettings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One instance's KV hand-over area on its node, writable by its pods alone."""
    path = str(kv_area_dir(PurePosixPath(settings.node_shm_dir), area))
    labels = {KV_AREA_LABEL: area}
    return _volume_pair(
        model, kv_claim_of(area), node, path, 1 << 30, "kv", False, settings, labels
    )


def instance_network_policy(
    model: Mapping[str, Any], instance: str, settings: OperatorSettings
) -> dict[str, Any]:
    """Ingress to an instance's pods: the gateway and the operator (which asks engines what
    is in flight during consolidation) on the worker port, and the instance's
    own stages on any port (vLLM's rendezvous, gloo pairs and ZMQ queues use random
    ports between stages). Egress is left to the cluster's defaults: workers need DNS,
    the model store and their node's prefetcher."""
    meta = model["metadata"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": instance,
            "namespace": meta["namespace"],
            "labels": worker_labels(meta["name"], instance),
            "ownerReferences": [owner_reference(model)],
        },
        "spec": {
            "podSelector": {"matchLabels": {INSTANCE_LABEL: instance}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {
                                    "kubernetes.io/metadata.name": settings.system_namespace
                                }
                            },
                            "podSelector": {"matchLabels": dict(labels)},
                        }
                        for labels in (settings.gateway_labels, settings.operator_labels)
                    ],
                    "ports": [{"protocol": "TCP", "port": settings.worker_port}],
                },
                {"from": [{"podSelector": {"matchLabels": {INSTANCE_LABEL: instance}}}]},
            ],
        },
    }
