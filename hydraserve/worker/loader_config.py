"""The loader's part of the worker configuration (no vLLM import needed to build it)."""

from __future__ import annotations

from typing import Any

from hydraserve.worker.config import WorkerConfig


def loader_extra_config(config: WorkerConfig) -> dict[str, Any]:
    """``--model-loader-extra-config`` for the ``hydraserve`` load format."""
    return {
        "uri": config.uri,
        "revision": config.revision,
        "shm_dir": str(config.shm_dir),
        "timeline": str(config.timeline) if config.timeline else None,
        "instance": config.instance,
        "timeout_seconds": config.fetch_timeout_seconds,
    }
