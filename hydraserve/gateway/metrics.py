"""Prometheus metrics of the gateway (one registry per app, so tests can run several).

Names follow Prometheus conventions: ``hydraserve_gateway_*`` for what the gateway itself
does, ``hydraserve_*`` for facts about the cluster it observes (instances, cold starts).
The ``model`` label only ever holds names of models that exist (``_unknown`` otherwise), so
clients cannot blow up the label cardinality with made-up names.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# The ``*_created`` series double the exposition and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

UNKNOWN_MODEL = "_unknown"

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "hydraserve_gateway_requests",
            "Requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.rejections = Counter(
            "hydraserve_gateway_rejections",
            "Requests refused or failed by the gateway, by reason.",
            ["model", "reason"],
            registry=r,
        )
        self.request_duration = Histogram(
            "hydraserve_gateway_request_duration_seconds",
            "Time from request arrival to the last byte of the response.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "hydraserve_gateway_time_to_first_token_seconds",
            "Streaming requests: arrival to first token event (queueing and cold start included).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "hydraserve_gateway_time_per_output_token_seconds",
            "Streaming requests: mean gap between token events after the first.",
            ["model"],
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.slo_requests = Counter(
            "hydraserve_gateway_slo_requests_total",
            "Streaming requests by whether they met the model's TTFT or TPOT SLO; start=cold "
            "when the request waited for an instance to start.",
            ["model", "slo", "start", "outcome"],
            registry=r,
        )
        self.slo_attainment = Gauge(
            "hydraserve_gateway_slo_attainment_ratio",
            "Share of the model's requests that met an SLO over the attainment window.",
            ["model", "slo", "start"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "hydraserve_gateway_queue_wait_seconds",
            "Time a request waited for a ready instance (0 when one was free).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "hydraserve_gateway_queue_depth",
            "Requests waiting for an instance.",
            ["model"],
            registry=r,
        )
        self.in_flight = Gauge(
            "hydraserve_gateway_in_flight_requests",
            "Requests accepted and not finished (waiting or running).",
            ["model"],
            registry=r,
        )
        self.desired_replicas = Gauge(
            "hydraserve_gateway_desired_replicas",
            "The autoscaler's latest decision.",
            ["model"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "hydraserve_gateway_upstream_retries",
            "Requests re-routed because an instance refused the connection.",
            ["model"],
            registry=r,
        )
        self.instances = Gauge(
            "hydraserve_instances",
            "Model instances by phase, as the control plane reports them.",
            ["model", "phase"],
            registry=r,
        )
        self.cold_starts = Counter(
            "hydraserve_cold_starts",
            "Instances that became ready (each one a cold start).",
            ["model"],
            registry=r,
        )
        self.cold_start_seconds = Histogram(
            "hydraserve_cold_start_seconds",
            "From instance requested to instance ready.",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.cold_start_prediction_error = Histogram(
            "hydraserve_cold_start_prediction_error_seconds",
            "Measured minus predicted time from instance requested to ready (the planner's "
            "error; positive: slower than predicted).",
            ["model"],
            buckets=(-60, -30, -10, -5, -2, -1, 0, 1, 2, 5, 10, 30, 60, 120),
            registry=r,
        )
        self.cold_start_stage_seconds = Histogram(
            "hydraserve_cold_start_stage_seconds",
            "Duration of each stage of a cold start (fetch, imports, weight load, ...).",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )

        self.migrations = Counter(
            "hydraserve_gateway_migrations",
            "Running requests moved to another instance, by method (recompute, kv).",
            ["model", "method"],
            registry=r,
        )
        self.migrations_skipped = Counter(
            "hydraserve_gateway_migrations_skipped",
            "Requests left to finish on a draining instance, by why they cannot move exactly.",
            ["model", "reason"],
            registry=r,
        )
        self.migration_stall = Histogram(
            "hydraserve_gateway_migration_stall_seconds",
            "Longest gap between token events a moved stream saw.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.consolidations = Counter(
            "hydraserve_consolidations",
            "Pipelines replaced by a standalone engine (outcome done), or not (abandoned).",
            ["model", "outcome"],
            registry=r,
        )
        self.consolidation_seconds = Histogram(
            "hydraserve_consolidation_seconds",
            "From a pipeline serving to its stages released (a standalone engine serving).",
            ["model"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.consolidation_stage_seconds = Histogram(
            "hydraserve_consolidation_stage_seconds",
            "Steps of a consolidation: fetch (whole model verified), promote (standalone "
            "routed), drain (promotion to stages released).",
            ["model", "stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )

        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the per-request path looks children up often."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
