"""Every constant of the planner's cost model, typed and documented in one place.

The defaults describe a GPU cluster like the paper's testbed (A10/V100 servers, 16 Gbps
NICs) running HydraServe workers. Measured values from the data-plane benchmark replace
them without code changes (``PlannerConfig.model_validate_json(...)``). The baselines the
simulator compares against are other settings of the same fields (see ``hydraserve.sim``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class PlannerConfig(BaseModel):
    """Cost-model constants and placement switches of :func:`hydraserve.planner.plan`.

    Predicted cold TTFT of a plan (seconds)::

        waited + max(engine_ready_floor, fetch_start_delay + fetch)
               + stage_bytes / tp / serial_load_rate + post_fetch
               + prefill * pipeline_slowdown

    where ``fetch`` is the slowest stage's bytes over its fetch rate (its fair share of the
    node's NIC, capped by its share of the store, or the host-memory rate when cached).
    Predicted TPOT is the sum over stages of the profiled single-GPU TPOT scaled by the
    stage's share of layers and, when GPUs are shared, by the inverse of its compute share,
    divided by the tensor-parallel speed-up ``1 + (tp - 1) * tensor_parallel_efficiency``
    of a stage on ``tp`` GPUs (prefill likewise).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- cold-start timeline -------------------------------------------------------------
    engine_ready_floor_s: float = Field(
        default=4.0,
        ge=0,
        description="Seconds from placement until a worker could be ready if every byte were "
        "already local: pod start, runtime import, engine build. Runs concurrently with the "
        "fetch (the worker streams tensors in as they land). Measured: the data-plane "
        "benchmark's engine-ready time with a pre-filled shared-memory stage.",
    )
    engine_ready_floor_by_gpu_type: dict[str, float] = Field(
        default_factory=dict,
        description="Engine-ready floor per GPU type (node label), where it differs from "
        "engine_ready_floor_s; a plan takes the largest of its nodes' floors. Calibration "
        "fits it from cold starts on nodes of one type.",
    )
    fetch_start_delay_s: float = Field(
        default=0.0,
        ge=0,
        description="Seconds from placement until the fetch starts. 0 with the node "
        "prefetcher (it starts before the pod exists); a worker that downloads its own "
        "weights after importing its runtime (serverless vLLM) starts late.",
    )
    serial_load_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="Rate of a load to the device that starts only after the fetch ends "
        "(bytes/s). None when tensors are adopted as they arrive (HydraServe).",
    )
    post_fetch_s: float = Field(
        default=2.0,
        ge=0,
        description="Seconds from a stage's last byte (or serial load) to ready: last "
        "tensors to the device, checksum, KV-cache allocation. The paper's artifact used 2 s.",
    )
    fetch_efficiency: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Fraction of a NIC's line rate a fetch achieves (protocol overheads).",
    )
    cache_load_bytes_per_s: float | None = Field(
        default=10e9,
        gt=0,
        description="Rate of loading a model held in the node's host-memory cache onto the "
        "device (bytes/s); None = instantaneous.",
    )

    def floor_for(self, gpu_type: str) -> float:
        return self.engine_ready_floor_by_gpu_type.get(gpu_type, self.engine_ready_floor_s)

    # --- inference speed ------------------------------------------------------------------
    default_prefill_s: float = Field(
        default=0.5, ge=0, description="Prefill seconds when the model has no profile."
    )
    default_tpot_s: float = Field(
        default=0.05, gt=0, description="TPOT (s/token) when the model has no profile."
    )
    stage_hop_s: float = Field(
        default=0.001,
        ge=0,
        description="Added per token per pipeline hop (activations between servers).",
    )
    tensor_parallel_efficiency: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Speed-up each GPU beyond the first adds to a tensor-parallel stage: "
        "a stage on tp GPUs runs its layers 1 + (tp - 1) * efficiency times faster than "
        "on one (the rest is lost to the all-reduces between ranks inside the node). "
        "Profiled speeds (ModelProfile.tpot_s / prefill_s) are per single GPU of a type; "
        "for a model larger than one GPU they are what one GPU would take if it fitted "
        "(decoding is memory-bandwidth bound: bytes / GPU memory bandwidth).",
    )
    compute_share_follows_memory: bool = Field(
        default=True,
        description="GPU sharing gives a worker compute in proportion to the memory it "
        "holds (as the paper's GPU-share isolation does), so a part-card stage runs its "
        "layers slower than an all-card stage.",
    )
    # --- placement ------------------------------------------------------------------------
    max_pp: int = Field(default=4, ge=1, le=4, description="Cluster-wide cap on pp.")
    network_admission: bool = Field(
        default=True,
        description="Admit a new fetch at a node only if every in-flight fetch there still "
        "meets its deadline under fair sharing. Off: ignore in-flight fetches (baselines).",
    )
    use_cache: bool = Field(
        default=True,
        description="Prefer nodes whose host cache holds the model (no network).",
    )
    exclusive_gpus: bool = Field(
        default=False,
        description="A worker takes a whole GPU (no GPU sharing): only an idle GPU fits, "
        "and its whole memory is reserved.",
    )
    placement: Literal["slo_best_fit", "first_fit"] = Field(
        default="slo_best_fit",
        description="slo_best_fit: among nodes fast enough for the TTFT SLO, the tightest "
        "memory fit. first_fit: the first node in inventory order with room (baseline).",
    )
    fallback: Literal["pp1", "fastest"] = Field(
        default="pp1",
        description="When no plan meets both SLOs: pp1 = a single worker (cheapest, as in "
        "the paper); fastest = the TPOT-feasible plan with the lowest predicted TTFT.",
    )
    part_card_pipelines: Literal["never", "too_big_for_any_node", "whenever_no_room"] = Field(
        default="too_big_for_any_node",
        description="When to plan a pipeline of part-card stages across nodes (it serves "
        "but never consolidates; the plan says why) instead of answering Unschedulable "
        "because no node can hold a whole replica on its tp GPUs: never; only when no "
        "node could even with its GPUs idle (a model larger than any node); or whenever "
        "none has the room now (starts sooner on a busy cluster, but such pipelines keep "
        "their TPOT cost: in the simulator's reference setting TTFT attainment rose and "
        "TPOT attainment fell by a few points).",
    )
    min_fetch_bytes_per_s: float = Field(
        default=1e6,
        ge=0,
        description="A node whose share for a new fetch is below this is not used.",
    )


class PlanningSettings(BaseModel):
    """The planner's inputs that come from settings, the same on every backend
    (``HYDRASERVE_<COMPONENT>_PLANNER`` as JSON, ``..._STORE_BYTES_PER_S``)."""

    planner: PlannerConfig = Field(
        default_factory=PlannerConfig,
        description="The planner's cost-model constants (JSON). The defaults describe a GPU "
        "cluster like the paper's; this machine's measured values are in "
        "benchmarks/README.md (engine-ready floor, post-fetch time).",
    )
    store_bytes_per_s: float | None = Field(
        default=None,
        gt=0,
        description="Aggregate bandwidth of the model store, shared by every node's fetches "
        "(bytes/s; None: unlimited, each node's NIC is the only limit).",
    )
