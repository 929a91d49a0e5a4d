"""Typed settings of the gateway, read from ``HYDRASERVE_GATEWAY_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class GatewaySettings(BaseSettings):
    """Everything the gateway's behaviour depends on; defaults suit a cluster deployment."""

    model_config = SettingsConfigDict(
        env_prefix="HYDRASERVE_GATEWAY_", env_nested_delimiter="__", extra="ignore"
    )

    host: str = Field(default="0.0.0.0", description="Address the gateway listens on.")
    port: int = Field(default=8000, ge=0, le=65535)

    namespaces: list[str] = Field(
        default_factory=list,
        description="Kubernetes namespaces whose ServerlessModels are served; empty = all.",
    )
    kubeconfig: Path | None = Field(
        default=None, description="Kubeconfig to use instead of the in-cluster credentials."
    )

    # --- auth -------------------------------------------------------------------------
    auth_enabled: bool = Field(
        default=True,
        description="Require API keys. Only the embedded one-machine platform turns this off.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="YAML file of hashed API keys (a mounted Kubernetes Secret works as is).",
    )
    api_keys_reload_seconds: float = Field(
        default=10.0, gt=0, description="How often the keys file is checked for changes."
    )
    metrics_require_key: bool = Field(
        default=False,
        description="GET /metrics needs an API key whose scope is every namespace and "
        "model: its series name every tenant's models (off: keep /metrics unreachable "
        "for tenants, e.g. with a NetworkPolicy).",
    )

    # --- requests ---------------------------------------------------------------------
    max_request_bytes: int = Field(
        default=4 << 20, ge=1024, description="Largest request body accepted (413 above)."
    )

    # --- admission queue (scale from zero) --------------------------------------------
    queue_size_per_model: int = Field(
        default=64,
        ge=1,
        description="Requests that may wait per model for an instance; more get 429.",
    )
    queue_timeout_seconds: float = Field(
        default=120.0,
        gt=0,
        description="Deadline for a waiting request to reach an instance; then 503.",
    )
    queue_full_retry_after_seconds: int = Field(default=2, ge=1)
    timeout_retry_after_seconds: int = Field(default=10, ge=1)
    stream_keepalive_seconds: float = Field(
        default=5.0,
        gt=0,
        description="Streaming requests waiting this long get SSE headers and then a "
        "keep-alive comment every interval, so proxies do not cut idle connections.",
    )
    watch_poll_seconds: float = Field(
        default=0.5, gt=0, description="Safety-net poll while requests wait for an instance."
    )

    # --- routing and upstream ---------------------------------------------------------
    max_outstanding_per_instance: int = Field(
        default=256,
        ge=1,
        description="Requests in flight on one instance before more wait in the queue "
        "(vLLM's default max_num_seqs).",
    )
    connect_attempts: int = Field(
        default=3, ge=1, description="Instances tried for a request that cannot connect."
    )
    unreachable_cooldown_seconds: float = Field(
        default=2.0, ge=0, description="How long an instance that refused a connection is skipped."
    )
    upstream_connect_timeout_seconds: float = Field(default=5.0, gt=0)
    upstream_read_timeout_seconds: float = Field(
        default=600.0, gt=0, description="Longest silence from an engine before giving up."
    )
    upstream_max_connections: int = Field(default=1024, ge=1)

    # --- moving running requests (consolidation) ------------------------------------------
    migration_enabled: bool = Field(
        default=True,
        description="Requests on a pipelined instance move to its replacement when it "
        "drains (one uninterrupted stream for the client); off: they finish where they are.",
    )
    migration_method: Literal["auto", "recompute", "kv"] = Field(
        default="auto",
        description="How a request moves: the cost model's choice, or always one method "
        "(KV transfer only where both engines share a node and load HydraServe's connector).",
    )
    migration_kv_bytes_per_s: float = Field(
        default=2e9, gt=0, description="Bandwidth the KV cache crosses when it moves."
    )
    migration_kv_fixed_seconds: float = Field(
        default=0.05, ge=0, description="Fixed cost of a KV transfer (save on abort, handshake)."
    )
    migration_prefill_tokens_per_s: float = Field(
        default=4000.0,
        gt=0,
        description="Prefill throughput assumed until the gateway has measured one.",
    )
    migration_learn_prefill: bool = Field(
        default=True,
        description="Learn the prefill throughput from observed first tokens (else always "
        "use migration_prefill_tokens_per_s).",
    )

    # --- autoscaling and observation ---------------------------------------------------
    autoscale_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often scale-down and keep-alive are evaluated."
    )
    observe_interval_seconds: float = Field(
        default=1.0, gt=0, description="How often instance phases are exported as metrics."
    )

    access_log: bool = Field(default=True, description="One log event per finished request.")
    slo_window_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="Window of the per-model SLO attainment (GET /v1/models/{id}, status).",
    )
    slo_report_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How often the attainment is written to each model's status.",
    )
