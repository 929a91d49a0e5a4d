"""The four serving policies the simulator compares, as settings of one planner.

Each policy is a :class:`PlannerConfig` (how it places workers and how long its cold start
takes, in the cost model's own terms) plus two switches the planner does not own:
consolidation of pipelines and a host-memory cache of whole models. The baselines'
timelines are calibrated to the paper's measured cold starts (Llama-2-13B on V100, 16 Gbps):
serverless vLLM 38.6 s, ServerlessLLM 26.2 s, HydraServe 8.7 s.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hydraserve.planner import PlannerConfig


@dataclass(frozen=True)
class SSDTier:
    """A second, larger checkpoint cache on each node's local SSD (ServerlessLLM's
    multi-tier storage): models fetched are written through to it, a hit loads from it
    at ``load_bytes_per_s`` (slower than the host-memory tier) and is promoted to memory."""

    capacity_bytes: int
    load_bytes_per_s: float


@dataclass(frozen=True)
class Policy:
    name: str
    planner: PlannerConfig
    consolidate: bool  # pipelines merge into standalone all-card workers after start
    host_cache: bool  # nodes keep whole models they fetched in an LRU host-memory cache
    description: str = ""
    ssd_tier: SSDTier | None = None  # only with host_cache


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

# ServerlessLLM's local tiers. The host-memory tier loads at 12 GB/s and its SSD tier at
# 5.6 GB/s: an ASSUMPTION, not a figure read off the ServerlessLLM paper (Fu et al.,
# OSDI '24, arXiv 2401.14351), whose loading figures could not be consulted here. Its text
# gives ~84 s to load LLaMA-2-70B (~130 GB) with the existing loaders and a 3.6-8.2x
# faster loader; 130 GB / (84 s / 8.2) ~ 12.7 GB/s (taken as the memory tier) and
# 130 GB / (84 s / 3.6) ~ 5.6 GB/s (taken as the SSD tier). 2 TB of NVMe per server.
SERVERLESSLLM_SSD = SSDTier(capacity_bytes=int(2e12), load_bytes_per_s=5.6e9)

SERVERLESSLLM = Policy(
    name="serverlessllm",
    # Locality first: a node holding the checkpoint in memory loads it with the fast
    # multi-tier loader (12 GB/s), one holding it on SSD at 5.6 GB/s; otherwise the
    # checkpoint is downloaded first. Container, runtime and engine start (11 s) follow
    # the load. One whole GPU per instance.
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
    description="pp=1, cache locality (memory + SSD tiers), fast local load, exclusive GPUs",
    ssd_tier=SERVERLESSLLM_SSD,
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


# The engine-ready floor every timeline above was calibrated at (the paper's GPUs).
REFERENCE_FLOOR_S = 4.0


def with_engine_floor(policy: Policy, floor_s: float) -> Policy:
    """``policy`` on hardware whose engine takes ``floor_s`` to be ready with its bytes
    local (imports, engine init, graphs), instead of the reference 4 s.

    The engine is the same for every policy, so every policy's engine start moves by the
    same amount: HydraServe's floor becomes ``floor_s`` (it overlaps the fetch), and the
    baselines' serial engine start after their load (``post_fetch_s``) grows by
    ``floor_s - 4``. HydraServe's own post-fetch time (verify, last tensors, ready) does
    not depend on the engine and is kept.
    """
    shift = floor_s - REFERENCE_FLOOR_S
    config = policy.planner
    if config.engine_ready_floor_s > 0:  # overlapping policies (HydraServe)
        update = {"engine_ready_floor_s": floor_s}
    else:  # serial policies: download, load, then start the engine
        update = {"post_fetch_s": max(0.0, config.post_fetch_s + shift)}
    return replace(policy, planner=config.model_copy(update=update))
