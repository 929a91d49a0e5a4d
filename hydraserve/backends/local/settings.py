"""Typed settings of the embedded backend (``HYDRASERVE_LOCAL_*``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings

from hydraserve.control.consolidation import ConsolidationSettings
from hydraserve.control.instances import LifecycleSettings
from hydraserve.planner.calibration import CalibrationSettings
from hydraserve.planner.config import PlanningSettings
from hydraserve.settings import CommonSettings, component_config


class LocalSettings(
    BaseSettings, ConsolidationSettings, LifecycleSettings, PlanningSettings, CalibrationSettings
):
    model_config = component_config("local")
    common: CommonSettings = Field(default_factory=CommonSettings)
    worker_host: str = "127.0.0.1"
    vllm_cache_root: Path | None = Field(
        default=None, description="vLLM compile cache; default <state_dir>/vllm-cache."
    )
    enforce_eager: bool = Field(
        default=True,
        description="Run engines eager (fastest start). On CPUs a pipeline stage (pp > 1) then "
        "runs with HydraServe's worker class, which allocates the later stages' input buffers "
        "that vLLM's CPU worker allocates only in compiled mode (decision 0105).",
    )
    pipeline_size: int | None = Field(
        default=None,
        ge=1,
        le=4,
        description="Force this pp for local instances (demos of a pipeline on one machine); "
        "None = the planner's choice.",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        description="Memory the planner may give instances on this machine (None: 80% of "
        "what is available at start).",
    )
    local_read_bytes_per_s: float = Field(
        default=2e9, gt=0, description="How fast this machine reads its local store."
    )
    retry_seconds: float = Field(
        default=15.0, gt=0, description="Delay before retrying a model that cannot start now."
    )
    poll_seconds: float = 0.1
    stop_grace_seconds: float = 10.0
    release_grace_seconds: float = Field(
        default=1.0,
        ge=0,
        description="SIGTERM-to-SIGKILL grace for a drained pipeline's stages (idle: "
        "nothing to finish, so its memory is given back at once).",
    )
    kv_cache_bytes: int = 256 << 20
    max_model_len: int = 1024
    cpu_binds: list[str] = Field(
        default_factory=list,
        description="VLLM_CPU_OMP_THREADS_BIND per stage, round-robin (empty: a pipeline's "
        "stages split the machine's cores; a single stage uses vLLM's own choice).",
    )
    prefetcher_url: str | None = Field(
        default=None,
        description="A node prefetcher's HTTP API to fetch through; None = one in-process.",
    )
    node_name: str = "local"
    extra_engine_args: list[str] = Field(default_factory=list)
    warm_runtime: bool = Field(
        default=True,
        description="Keep a warm runtime per node, an interpreter that has imported the "
        "engine, and fork each worker (and every Python process it starts) from it "
        "instead of starting fresh interpreters (decision 0600).",
    )
    compile_artifacts: bool = Field(
        default=True,
        description="Share what a stage's engine compiles through the store beside the "
        "model, so a later start of that stage on any node skips compiling (decision 0601).",
    )
    worker_sandbox: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="Run each worker in a mount namespace that shows it only its own "
        "model (read-only) and its instance's KV area of the node's shared memory, as "
        "its PersistentVolumeClaims do on Kubernetes; 'auto': where this machine allows "
        "it (root).",
    )

    # --- consolidation ----------------------------------------------------------------
    consolidation_cpu_bind: str | None = Field(
        default=None,
        description="VLLM_CPU_OMP_THREADS_BIND of the standalone engine; None = the "
        "pipeline stages' binds together (it takes over their cores).",
    )
