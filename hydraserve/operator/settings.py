"""Typed settings of the operator, from ``HYDRASERVE_OPERATOR_*`` environment variables.

The Helm chart renders these from its values; nested/list values are JSON
(``HYDRASERVE_OPERATOR_WORKER_TOLERATIONS='[{"key": "nvidia.com/gpu", ...}]'``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings

from hydraserve.control.consolidation import ConsolidationSettings
from hydraserve.control.instances import LifecycleSettings
from hydraserve.control.policy import TenancySettings
from hydraserve.planner.calibration import CalibrationSettings
from hydraserve.planner.config import PlanningSettings
from hydraserve.settings import component_config


class OperatorSettings(
    BaseSettings,
    ConsolidationSettings,
    LifecycleSettings,
    PlanningSettings,
    CalibrationSettings,
    TenancySettings,
):
    model_config = component_config("operator")

    # Which ServerlessModels to reconcile.
    namespaces: list[str] = Field(
        default_factory=list, description="Namespaces to watch; empty = all namespaces."
    )

    # Worker pods.
    worker_image: str = "ghcr.io/hydraserve/worker:0.1.0"
    worker_image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: list[str] = Field(default_factory=list)
    worker_port: int = Field(default=8000, ge=1, le=65535, description="Stage 0's HTTP port.")
    master_port: int = Field(default=29500, ge=1, le=65535, description="Stage rendezvous port.")
    worker_cpu: str = "4"
    worker_memory: str = "32Gi"
    worker_tolerations: list[dict[str, Any]] = Field(default_factory=list)
    worker_service_account: str | None = None
    worker_run_as_user: int | None = Field(
        default=10001, description="UID of the worker container (None = the image's)."
    )
    worker_priority_class: str | None = None
    worker_compiled: bool = Field(
        default=False, description="Run vLLM compiled (CUDA graphs) instead of eager."
    )
    worker_extra_env: dict[str, str] = Field(default_factory=dict)
    gloo_socket_ifname: str = Field(
        default="eth0", description="Pod interface the stages' gloo pairs bind to."
    )
    shm_host_path: str = Field(default="/dev/shm", description="Host tmpfs the prefetcher fills.")
    worker_dshm_size: str = Field(
        default="1Gi", description="Size of the worker's own /dev/shm (vLLM's queues)."
    )
    s3_endpoint_url: str | None = None
    s3_credentials_secret: str | None = Field(
        default=None,
        description="Secret (in each model's namespace) with AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, mounted into workers as optional env.",
    )
    cluster_domain: str = "cluster.local"

    @property
    def node_shm_dir(self) -> str:
        """The prefetcher's directory on each node (it mounts ``shm_host_path`` at
        /dev/shm and keeps models in /dev/shm/hydraserve)."""
        return f"{self.shm_host_path.rstrip('/')}/hydraserve"

    # GPUs: whole devices (nvidia.com/gpu) or a GPU-sharing device plugin's memory resource.
    gpu_resource_name: str = "nvidia.com/gpu"
    gpu_resource_mode: Literal["count", "memory"] = "count"
    gpu_memory_unit_bytes: int = Field(
        default=1 << 30, ge=1, description="Bytes per unit of a memory-mode GPU resource."
    )
    default_gpu_memory_gib: float = Field(
        default=16.0, gt=0, description="GPU memory when no node label or annotation says."
    )
    default_nic_gbps: float = Field(
        default=10.0, gt=0, description="Node NIC bandwidth when no label or annotation says."
    )

    # Node prefetchers (a DaemonSet), found per node by these labels.
    prefetcher_namespace: str = "hydraserve-system"
    prefetcher_labels: dict[str, str] = Field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "hydraserve",
            "app.kubernetes.io/component": "prefetcher",
        }
    )
    prefetcher_port: int = Field(default=8300, description="Used when the pod names no port.")

    # Network isolation of worker pods (docs/security.md): a NetworkPolicy per instance
    # admits only the gateway (on the worker port) and the instance's own stages.
    network_policy: bool = Field(
        default=True, description="Create a NetworkPolicy for each instance's pods."
    )
    system_namespace: str = Field(
        default="hydraserve-system", description="Namespace of the gateway and operator pods."
    )
    gateway_labels: dict[str, str] = Field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "hydraserve",
            "app.kubernetes.io/component": "gateway",
        },
        description="Labels that select the gateway's pods.",
    )
    operator_labels: dict[str, str] = Field(
        default_factory=lambda: {
            "app.kubernetes.io/name": "hydraserve",
            "app.kubernetes.io/component": "operator",
        },
        description="Labels that select the operator's pods (it asks engines what is in "
        "flight during consolidation).",
    )
    prefetcher_use_host_port: bool = Field(
        default=False, description="Reach prefetchers at hostIP:hostPort instead of pod IP."
    )
    preload_timeout_seconds: float = Field(default=10.0, gt=0)

    # Reconciliation.
    resync_seconds: float = Field(default=30.0, gt=0, description="Periodic full reconcile.")
    retry_seconds: float = Field(
        default=15.0, gt=0, description="Delay before retrying a model that cannot start now."
    )
    node_status_max_age_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How old a node prefetcher's status may be when a pass reads it (one "
        "GET per node per interval, shared by all models).",
    )
    starting_poll_seconds: float = Field(
        default=1.0,
        gt=0,
        description="How often a model with a starting instance is looked at (its stages' "
        "bytes are verified over HTTP, which no watch event announces).",
    )

    # Pipeline consolidation (decision 0402; the shared fields: ConsolidationSettings).
    # Drain grace is longer than on one machine: the gateway is a network hop away.
    drain_grace_seconds: float = Field(
        default=2.0,
        ge=0,
        description="A draining pipeline is released once its engine has been idle this long.",
    )
    consolidation_poll_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often a consolidating model is looked at (fetch state, drain).",
    )
    probe_timeout_seconds: float = Field(
        default=2.0, gt=0, description="Timeout of prefetcher status and in-flight probes."
    )

    # Leader election (kopf peering) and health.
    peering_name: str = "hydraserve"
    standalone: bool = Field(default=False, description="No peering (a single replica).")
    priority: int | None = Field(
        default=None, description="Peering priority; None = random, so one replica leads."
    )
    liveness_endpoint: str | None = "http://0.0.0.0:8080/healthz"
    post_events: bool = True
