"""The four serving policies the simulator compares, as settings of one planner.

Each policy is a :class:`PlannerConfig` (how it places workers and how long its cold start
takes, in the cost model's own terms) plus two switches the planner does not own:
consolidation of pipelines and a host-memory cache of whole models. The baselines'
timelines are calibrated to the paper's measured cold starts (Llama-2-13B on V100, 16 Gbps):
serverless vLLM 38.6 s, ServerlessLLM 26.2 s, HydraServe 8.7 s.
"""

from __future__ import annotations

from dataclasses import dataclass

from hydraserve.planner import PlannerConfig


@dataclass(frozen=True)
class Policy:
    name: str
    planner: PlannerConfig
    consolidate: bool  # pipelines merge into standalone all-card workers after start
    host_cache: bool  # nodes keep whole models they fetched in an LRU host-memory cache
    description: str = ""


HYDRASERVE_CONFIG = PlannerConfig(use_cache=False)

SERVERLESS_VLLM = Policy(
    name="serverless-vllm",
    # The worker starts its container and imports its runtime (11 s), then downloads the
    # whole model over its node's NIC, then loads it (2.5 GB/s) and builds the engine
    # (4 s). Placement: first node with room, blind to the network.
    planner=PlannerConfig(
        max_pp=1,
        network_admission=False,
        use_cache=False,
        placement="first_fit",
        engine_ready_floor_s=0.0,
        fetch_start_delay_s=11.0,
        serial_load_bytes_per_s=2.5e9,
        post_fetch_s=4.0,
    ),
    consolidate=False,
    host_cache=False,
    description="pp=1, first fit, serial download-load-init",
)

SERVERLESSLLM = Policy(
    name="serverlessllm",
    # Locality first: a node holding the checkpoint loads it with the fast multi-tier
    # loader (12 GB/s); otherwise the checkpoint is downloaded first. Container, runtime
    # and engine start (11 s) follow the download. One whole GPU per instance.
    planner=PlannerConfig(
        max_pp=1,
        network_admission=False,
        use_cache=True,
        cache_load_bytes_per_s=None,
        exclusive_gpus=True,
        engine_ready_floor_s=0.0,
        fetch_start_delay_s=0.0,
        serial_load_bytes_per_s=12e9,
        post_fetch_s=11.0,
    ),
    consolidate=False,
    host_cache=True,
    description="pp=1, cache locality, fast local load, exclusive GPUs",
)

HYDRASERVE = Policy(
    name="hydraserve",
    planner=HYDRASERVE_CONFIG,
    consolidate=True,
    host_cache=False,
    description="SLO-sized pipelines, network admission, overlap, consolidation",
)

HYDRASERVE_CACHE = Policy(
    name="hydraserve+cache",
    planner=HYDRASERVE_CONFIG.model_copy(update={"use_cache": True}),
    consolidate=True,
    host_cache=True,
    description="HydraServe with the prefetchers' host-memory model cache",
)

POLICIES: dict[str, Policy] = {
    p.name: p for p in (SERVERLESS_VLLM, SERVERLESSLLM, HYDRASERVE, HYDRASERVE_CACHE)
}
