"""Typed configuration of one worker process (one pipeline stage of one instance)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from hydraserve.settings import CommonSettings


class StageAddress(BaseModel):
    """Where the stages of a pipelined instance meet (vLLM's multi-node rendezvous)."""

    master_addr: str = "127.0.0.1"
    master_port: int = Field(default=29500, ge=1, le=65535)


class WorkerConfig(BaseModel):
    model_name: str = Field(description="The served (OpenAI) model name.")
    uri: str
    revision: str = "main"
    instance: str = Field(description="Instance id, shared by the stages of one pipeline.")
    pp: int = Field(default=1, ge=1, le=4)
    rank: int = Field(default=0, ge=0, le=3)
    tp: int = Field(
        default=1,
        ge=1,
        le=8,
        description="Tensor-parallel ranks of this stage, all on this node (vLLM's "
        "--tensor-parallel-size; its mp executor starts one process per rank).",
    )
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=1, le=65535)
    rendezvous: StageAddress = Field(default_factory=StageAddress)
    prefetcher_url: str | None = Field(
        default=None, description="Node prefetcher to ask for the stage; None = fetch here."
    )
    shm_dir: Path = Field(default_factory=lambda: CommonSettings().shm_dir)
    timeline: Path | None = None
    enforce_eager: bool = True
    inprocess_engine: bool = Field(
        default=True,
        description="pp=1: run vLLM's engine core and model runner in the API process "
        "(faster cold start; the API loop then shares the GIL with the engine).",
    )
    max_model_len: int = 1024
    max_num_batched_tokens: int = 256
    max_num_seqs: int = 16
    kv_cache_bytes: int = Field(default=256 << 20, description="KV cache size, bytes.")
    block_size: int | None = Field(
        default=None,
        ge=16,
        description="KV cache block size (tokens); None = the engine's (128 on CPU). A KV "
        "transfer moves whole blocks, so engines that exchange KV must agree on it.",
    )
    kv_transfer: bool = Field(
        default=False,
        description="Load HydraServe's KV connector: save the KV of requests that move away "
        "(aborted with a save key) and load it for requests that move here.",
    )
    kv_area: str | None = Field(
        default=None,
        description="The instance's KV hand-over area (a directory under <shm>/kv, shared "
        "only by a pipeline and the standalone that replaces it); None: this instance's.",
    )
    engine_args: list[str] = Field(default_factory=list)
    artifact_scope: str | None = Field(
        default=None,
        description="Share compile artifacts through the store beside the model, under this "
        "scope (the model's namespace: tenants never run each other's compiled code); "
        "None: off (decision 0601).",
    )
    artifact_max_bytes: int = Field(default=512 << 20, ge=0)
    fetch_timeout_seconds: float = 600.0
