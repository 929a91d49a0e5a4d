"""Pydantic models of the ``ServerlessModel`` resource (``hydraserve.io/v1alpha1``).

These classes are the one source of truth: the CRD's ``openAPIV3Schema`` is generated
from them (``hydraserve.api.crd``) and a test checks that the committed CRD agrees.
Field names are camelCase on the wire (Kubernetes convention) and snake_case in Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

GROUP = "hydraserve.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ServerlessModel"
PLURAL = "serverlessmodels"

# One path segment that is neither "." nor "..": no URI can climb out of its prefix. Written
# without look-ahead because the API server checks CRD patterns with RE2.
_SEGMENT = r"(?:[^/\s.][^/\s]*|\.[^/\s.][^/\s]*|\.\.[^/\s]+)"
# s3://bucket/prefix, file:///abs/path, or an absolute local path (embedded platform);
# whether a namespace may use a scheme or prefix is admin policy (control/policy.py).
SOURCE_URI_PATTERN = (
    rf"^(s3://[a-z0-9][a-z0-9.\-]{{1,61}}[a-z0-9](/{_SEGMENT})*/?"
    rf"|file://(/{_SEGMENT})+/?|(/{_SEGMENT})+/?)$"
)
# A revision names a directory: it may not be '.' or '..' or start with a dot.
REVISION_PATTERN = r"^[A-Za-z0-9_\-][A-Za-z0-9._\-]*$"
# A container image reference: [registry[:port]/]path[:tag][@sha256:digest].
IMAGE_PATTERN = (
    r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)*"
    r"(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$"
)
# DNS-1123 label: what a model name must be to become pod and service names.
MODEL_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class _Wire(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=False
    )


class SourceSpec(_Wire):
    """Where the model's weights live in the model store."""

    uri: Annotated[
        str,
        Field(
            pattern=SOURCE_URI_PATTERN,
            max_length=1024,
            description="Model location in the store: s3://bucket/prefix or file:///path "
            "(no '.' or '..' segments).",
        ),
    ]
    revision: Annotated[
        str,
        Field(
            default="main",
            min_length=1,
            max_length=128,
            pattern=REVISION_PATTERN,
            description="Revision (a directory under the model's location; it may not "
            "start with '.').",
        ),
    ]


class SLOSpec(_Wire):
    """Latency objectives the planner plans against."""

    ttft_seconds: Annotated[
        float,
        Field(default=10.0, gt=0, le=3600, description="Target cold time-to-first-token, seconds."),
    ]
    tpot_milliseconds: Annotated[
        float, Field(default=200.0, gt=0, le=60000, description="Target time per output token, ms.")
    ]


class ResourcesSpec(_Wire):
    """What one full replica needs; the planner splits it across pipeline stages."""

    gpu_memory_gi_b: Annotated[
        float,
        Field(
            default=16.0,
            gt=0,
            le=4096,
            alias="gpuMemoryGiB",
            description="GPU memory one full replica needs (weights plus KV cache), GiB.",
        ),
    ]


MIN_LE_MAX_RULE = "self.minReplicas <= self.maxReplicas"
MIN_LE_MAX_MESSAGE = "scaling.minReplicas must not exceed scaling.maxReplicas"


class ScalingSpec(_Wire):
    """How many replicas the model may have and when idle ones go away."""

    # The same rule, as CEL, makes the API server reject the object (see hydraserve.api.crd).
    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": MIN_LE_MAX_RULE, "message": MIN_LE_MAX_MESSAGE}]
        }
    )

    min_replicas: Annotated[
        int, Field(default=0, ge=0, le=64, description="Replicas kept even when idle.")
    ]
    max_replicas: Annotated[
        int, Field(default=4, ge=1, le=64, description="Most replicas the autoscaler may ask for.")
    ]
    keep_alive_seconds: Annotated[
        float,
        Field(default=30.0, ge=0, le=86400, description="Idle time before scale to zero."),
    ]
    target_concurrency: Annotated[
        int, Field(default=8, ge=1, le=1024, description="In-flight requests per replica.")
    ]

    @model_validator(mode="after")
    def _min_le_max(self) -> ScalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"{MIN_LE_MAX_MESSAGE} (minReplicas={self.min_replicas}, "
                f"maxReplicas={self.max_replicas})"
            )
        return self


class PipelineSpec(_Wire):
    """Pipeline-parallel cold starts: each stage fetches its share over its own node's NIC."""

    max_size: Annotated[
        int,
        Field(
            default=4,
            ge=1,
            le=4,
            description="Largest pipeline for a cold start; 1 turns pipelined cold starts off.",
        ),
    ]


TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
# Engine arguments the platform sets itself from the spec (parallelism) and the plan (pp).
PLATFORM_ENGINE_FLAGS = (
    "--tensor-parallel-size",
    "-tp",
    "--pipeline-parallel-size",
    "-pp",
    "--data-parallel-size",
    "-dp",
    "--distributed-executor-backend",
)


class ParallelismSpec(_Wire):
    """How many GPUs each worker (each pipeline stage) of an instance uses."""

    tensor: Annotated[
        Literal[1, 2, 4, 8],
        Field(
            default=1,
            description="GPUs of one node each worker uses (the engine's tensor "
            "parallelism): 1, 2, 4 or 8. A stage's memory is split evenly over them; "
            "resources.gpuMemoryGiB stays what a whole replica needs, and pipeline stages "
            "still go to distinct nodes (pipeline.maxSize keeps its meaning).",
        ),
    ]


class EngineSpec(_Wire):
    """The inference engine (vLLM) of the worker pods."""

    image: Annotated[
        str | None,
        Field(
            default=None,
            max_length=512,
            pattern=IMAGE_PATTERN,
            description="Worker image override (only images the admin allows).",
        ),
    ]
    args: Annotated[
        list[Annotated[str, Field(max_length=1024)]],
        Field(
            default_factory=list,
            max_length=64,
            description="Extra vLLM engine arguments (only flags the admin allows).",
        ),
    ]


class ServerlessModelSpec(_Wire):
    """What to serve and the objectives it is planned against."""

    source: SourceSpec
    slo: SLOSpec = Field(default_factory=SLOSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    pipeline: PipelineSpec = Field(default_factory=PipelineSpec)
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    engine: EngineSpec = Field(default_factory=EngineSpec)
    replicas: Annotated[
        int | None,
        Field(
            default=None,
            ge=0,
            le=64,
            description="Desired replicas, set by the gateway's autoscaler (scale subresource).",
        ),
    ]

    @model_validator(mode="after")
    def _parallelism_is_the_platforms(self) -> ServerlessModelSpec:
        flags = platform_engine_flags(self.engine.args)
        if flags:
            raise ValueError(
                f"engine.args must not set {', '.join(flags)}: the platform sets the "
                "engine's parallelism (use parallelism.tensor; the pipeline size is planned "
                "per cold start, up to pipeline.maxSize)"
            )
        return self


def engine_flags(args: Sequence[str]) -> list[str]:
    """The flags of an engine argument list (``--a=1``, ``--a 1``, ``-x``), each once,
    normalised as vLLM's parser reads them: underscores in long names are dashes."""
    flags: list[str] = []
    for arg in args:
        if not arg.startswith("-") or _is_number(arg):
            continue  # a value of the previous flag
        flag = arg.split("=", 1)[0]
        if flag.startswith("--"):
            flag = "--" + flag[2:].replace("_", "-")
        if flag not in flags:
            flags.append(flag)
    return flags


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def platform_engine_flags(args: Sequence[str]) -> list[str]:
    """The flags among ``args`` that only the platform may set (``PLATFORM_ENGINE_FLAGS``)."""
    return [f for f in engine_flags(args) if f in PLATFORM_ENGINE_FLAGS]


class ModelPhase(StrEnum):
    COLD = "Cold"
    STARTING = "Starting"
    SERVING = "Serving"
    CONSOLIDATING = "Consolidating"
    FAILED = "Failed"


class InstancePhase(StrEnum):
    """Where one instance is in its life (the gateway routes new requests to Ready ones)."""

    STARTING = "Starting"
    READY = "Ready"
    DRAINING = "Draining"  # taking no new requests (replaced or scaling down)
    FAILED = "Failed"


class InstanceOrigin(StrEnum):
    COLD_START = "cold_start"  # started for demand: its start is a cold start
    CONSOLIDATION = "consolidation"  # a standalone engine that replaces a pipeline


class Condition(_Wire):
    type: str
    status: Annotated[str, Field(pattern=r"^(True|False|Unknown)$")]
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class StageTiming(_Wire):
    """One stage of a cold start, seconds relative to the moment it was requested."""

    stage: str
    start: float
    end: float


class ColdStartPrediction(_Wire):
    """What the planner predicted for this cold start (its cost model's terms)."""

    ttft_seconds: float = Field(description="Predicted cold TTFT of the first request.")
    ready_seconds: float = Field(
        description="Predicted time from the request to the instance ready (the TTFT "
        "without waiting and prefill): what the measured cold start is compared with."
    )
    tpot_seconds: float = 0.0
    terms: dict[str, float] = Field(
        default_factory=dict, description="The cost model's named terms (seconds, bytes/s)."
    )
    gpu_type: str | None = Field(
        default=None, description="The GPU type of its nodes (null: a mix of types)."
    )


class WorkerStatus(_Wire):
    pod: str
    node: str
    stage: int
    layers: str = Field(description="Layer range [start, end) this stage serves, e.g. '0-16'.")
    ready: bool = False


class InstanceStatus(_Wire):
    name: str = Field(description="Instance id (also the name of its head Service).")
    pp: int = Field(ge=1, le=4, description="Pipeline stages of this instance.")
    tp: int = Field(
        default=1, ge=1, le=8, description="GPUs of one node each of its stages runs on."
    )
    workers: list[WorkerStatus] = Field(default_factory=list)
    endpoint: str | None = Field(
        default=None, description="Base URL of the instance's OpenAI server (stage 0)."
    )
    ready: bool = Field(default=False, description="Takes new requests (phase Ready).")
    # Not nullable (the API server would check null against the enum); a status written
    # before these fields existed reads as Starting/cold_start, and ``ready`` wins then.
    phase: InstancePhase = Field(
        default=InstancePhase.STARTING,
        description="Starting, Ready, Draining (taking no new requests: its in-flight "
        "requests move to the instance that replaces it) or Failed.",
    )
    origin: InstanceOrigin = Field(
        default=InstanceOrigin.COLD_START,
        description="cold_start (started for demand) or consolidation (a standalone engine "
        "replacing a pipelined instance; not a replica until it is promoted).",
    )
    cold_start: list[StageTiming] = Field(
        default_factory=list, description="Cold-start stage breakdown, seconds."
    )
    requested_at: float | None = Field(
        default=None, description="When the instance was asked for (epoch seconds)."
    )
    ready_at: float | None = Field(
        default=None, description="When it first served with every stage's bytes verified."
    )
    verified_at: float | None = Field(
        default=None, description="When the last of its stages' bytes was verified."
    )
    kv_transfer: bool = Field(
        default=False,
        description="Its engine saves and loads KV caches through the node's shared memory, "
        "so requests can move to or from it by KV transfer.",
    )
    prediction: ColdStartPrediction | None = Field(
        default=None, description="The planner's prediction for its cold start."
    )
    consolidation: Condition | None = Field(
        default=None,
        description="Set (status False) when this pipeline will not be consolidated, with "
        "the reason and why (e.g. no node has the GPUs free for a whole replica).",
    )
    error: str | None = Field(default=None, description="Why it failed (phase Failed).")


class ConsolidationStatus(_Wire):
    """A finished or abandoned consolidation; epoch seconds, null for steps not reached."""

    pipeline: str = Field(description="The pipelined instance that was replaced.")
    standalone: str = Field(description="The standalone engine that replaced it.")
    started_at: float = Field(description="The standalone engine was started.")
    fetched_at: float | None = Field(
        default=None, description="The whole model was verified on the node."
    )
    promoted_at: float | None = Field(
        default=None, description="The standalone took over; the pipeline began draining."
    )
    released_at: float | None = Field(default=None, description="The pipeline's pods were deleted.")
    outcome: str = Field(default="done", pattern=r"^(done|abandoned)$")
    reason: str = ""

    @property
    def seconds(self) -> float | None:
        """Pipeline ready to pipeline released (None unless it completed)."""
        if self.outcome != "done" or self.released_at is None:
            return None
        return max(0.0, self.released_at - self.started_at)


class FailureStatus(_Wire):
    """Instances that failed in a row, and when the next one may start.

    The lifecycle policy (``hydraserve.control.instances``) backs off exponentially between
    attempts and gives up after too many; the count resets when an instance becomes ready,
    the spec changes or the model scales to zero."""

    consecutive: int = Field(default=0, ge=0, description="Instances that failed in a row.")
    last_instance: str | None = None
    last_error: str | None = None
    last_failed_at: float | None = Field(default=None, description="Epoch seconds.")
    retry_at: float | None = Field(
        default=None,
        description="No new instance before this (epoch seconds); null when not backing off.",
    )
    gave_up: bool = Field(
        default=False, description="Too many failures: no instance starts until reset."
    )
    template: str | None = Field(
        default=None, description="Template hash the failed instances were made from."
    )


class AttainmentStatus(_Wire):
    """How often requests met one SLO over the window (null: no such request)."""

    met: int = Field(default=0, ge=0)
    missed: int = Field(default=0, ge=0)
    ratio: float | None = Field(default=None, ge=0, le=1, description="met / (met + missed).")


class SloAttainmentStatus(_Wire):
    """The share of the model's requests that met ``spec.slo``, over a sliding window,
    measured by the gateway. Cold requests waited for an instance to start; warm ones
    found one ready."""

    window_seconds: float = Field(gt=0)
    updated_at: float = Field(description="When the gateway computed it (epoch seconds).")
    ttft_cold: AttainmentStatus = Field(default_factory=AttainmentStatus)
    ttft_warm: AttainmentStatus = Field(default_factory=AttainmentStatus)
    tpot_cold: AttainmentStatus = Field(default_factory=AttainmentStatus)
    tpot_warm: AttainmentStatus = Field(default_factory=AttainmentStatus)


class ServerlessModelStatus(_Wire):
    """Observed state, written by the operator."""

    phase: ModelPhase = ModelPhase.COLD
    replicas: int = Field(default=0, description="Instances that exist (starting or ready).")
    ready_replicas: int = Field(default=0, description="Instances ready to serve.")
    selector: str | None = Field(
        default=None, description="Label selector of the instances' head pods (scale subresource)."
    )
    instances: list[InstanceStatus] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    consolidations: list[ConsolidationStatus] = Field(
        default_factory=list,
        description="The latest finished consolidations, oldest first (at most 16).",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["pipeline"],
        },
    )
    last_cold_start_seconds: float | None = Field(
        default=None, description="Request-to-ready time of the latest cold start, seconds."
    )
    failures: FailureStatus = Field(default_factory=FailureStatus)
    slo_attainment: SloAttainmentStatus | None = Field(
        default=None, description="Written by the gateway; the operator keeps it."
    )
    observed_generation: int | None = None


class ObjectMeta(_Wire):
    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)
    name: Annotated[str, Field(pattern=MODEL_NAME_PATTERN, max_length=63)]
    namespace: str = "default"


class ServerlessModel(_Wire):
    """A model that scales from zero. ``metadata.name`` is the OpenAI ``model`` name."""

    api_version: str = API_VERSION
    kind: str = KIND
    metadata: ObjectMeta
    spec: ServerlessModelSpec
    status: ServerlessModelStatus = Field(default_factory=ServerlessModelStatus)

    @property
    def name(self) -> str:
        return self.metadata.name
