"""The ``hydraserve`` load format: adopt each tensor from shared memory as it arrives.

vLLM calls :meth:`HydraServeLoader.load_weights` in every worker process after building
the model skeleton. For each tensor of this process's pipeline stage, in file order, the
loader waits for the node's fetch to verify it, then

* on CPU, with the store in vLLM's own layout, points the parameter at the bytes in
  shared memory (``param.data = view``: no copy);
* on a GPU, copies it host→device on a side stream while later tensors still arrive;
* otherwise hands it to the model's own ``load_weights`` (names it must remap).

It never reads a byte the fetch has not verified, and it fails with a clear message if a
parameter of the stage got no tensor.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from hydraserve.logs import get_logger
from hydraserve.prefetcher.shm import ModelShm
from hydraserve.store.manifest import Manifest
from hydraserve.worker.source import StageSource
from hydraserve.worker.timeline import Timeline
from hydraserve.worker.views import TORCH_DTYPES, process_memory, tensor_view

LOAD_FORMAT = "hydraserve"


# Keep the mappings alive for the life of the process: adopted parameters point into them.
_LIVE_SOURCES: list[StageSource] = []

log = get_logger("worker.loader")


class LoaderConfig(BaseModel):
    """What ``--model-loader-extra-config`` carries to every worker process."""

    uri: str
    revision: str = "main"
    shm_dir: str
    timeline: str | None = None
    instance: str | None = None
    timeout_seconds: float = 600.0
    zero_copy: bool = True
    overlap_compile: bool = Field(
        default=True,
        description="In compiled mode, adopt the mapped stage at once so compilation and "
        "warm-up overlap the fetch (only where post-load processing never reads weights).",
    )


def _pp_rank_and_size() -> tuple[int, int]:
    from vllm.distributed import get_pp_group

    group = get_pp_group()
    return int(group.rank_in_group), int(group.world_size)


class HydraServeLoader(BaseModelLoader):
    def __init__(self, load_config: LoadConfig) -> None:
        super().__init__(load_config)
        self.config = LoaderConfig.model_validate(load_config.model_loader_extra_config or {})

    def download_model(self, model_config: ModelConfig) -> None:
        # The launcher (or the node prefetcher) has already started the fetch.
        return None

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        started = time.time()
        rank, pp = _pp_rank_and_size()
        shm = ModelShm(Path(self.config.shm_dir), self.config.uri, self.config.revision)
        manifest = Manifest.model_validate_json(shm.manifest_path.read_bytes())
        source = StageSource(
            shm,
            manifest,
            pp if pp > 1 else None,
            rank if pp > 1 else None,
            timeout_seconds=self.config.timeout_seconds,
        )
        _LIVE_SOURCES.append(source)
        timeline = Timeline(
            Path(self.config.timeline) if self.config.timeline else None,
            model=manifest.name,
            instance=self.config.instance,
            rank=rank,
        )
        params = dict(model.named_parameters())
        if self._can_adopt_early(model_config, manifest, source, params):
            self._adopt_early(params, source, timeline, started)
            return
        memory_before = process_memory()
        stats = self._adopt_all(model, params, manifest, source)
        memory_after = process_memory()
        timeline.record(
            "weight_load",
            started,
            time.time(),
            waited_s=round(source.stats.waited_seconds, 4),
            stage_bytes=sum(t.size for t in source.tensors),
            anon_growth_bytes=memory_after["RssAnon"] - memory_before["RssAnon"],
            **stats,
        )

    def _can_adopt_early(
        self,
        model_config: ModelConfig,
        manifest: Manifest,
        source: StageSource,
        params: dict[str, nn.Parameter],
    ) -> bool:
        """Early adoption is safe only if nothing reads the weights before ready: compiled
        mode on CPU, bf16 in the engine's own layout (no repacking after load)."""
        if not (self.config.overlap_compile and self.config.zero_copy):
            return False
        if model_config.enforce_eager or manifest.dtype != "BF16" or manifest.layout != "vllm":
            return False
        if any(p.device.type != "cpu" for p in params.values()):
            return False
        names = {t.name for t in source.tensors}
        return names == set(params) and all(
            tuple(params[t.name].shape) == tuple(t.shape)
            and params[t.name].dtype == TORCH_DTYPES[t.dtype]
            for t in source.tensors
        )

    def _adopt_early(
        self,
        params: dict[str, nn.Parameter],
        source: StageSource,
        timeline: Timeline,
        started: float,
    ) -> None:
        """Point every parameter at its (possibly still arriving) bytes, then verify in the
        background. The control plane marks the instance ready only once every stage's
        fetch is verified; if a fetch fails, this process exits rather than serve."""
        source.wait_started()
        buffer = source.buffer()
        for info in source.tensors:
            params[info.name].data = tensor_view(buffer, info)
        timeline.record("weight_load", started, time.time(), adopted_early=len(params))

        def verify() -> None:
            try:
                for info in source.tensors:
                    source.wait_for(info)
            except Exception as exc:
                log.error("weights.unverified", error=str(exc))
                os._exit(3)  # never serve with unverified weights
            timeline.record(
                "weights_verified", started, time.time(), waited_s=source.stats.waited_seconds
            )

        threading.Thread(target=verify, name="hydraserve-verify", daemon=True).start()

    def _adopt_all(
        self,
        model: nn.Module,
        params: dict[str, nn.Parameter],
        manifest: Manifest,
        source: StageSource,
    ) -> dict[str, Any]:
        buffer = source.buffer()
        adopted: set[str] = set()
        copied = 0
        side_stream = None
        remap: list[tuple[str, torch.Tensor]] = []
        for info in source.tensors:
            source.wait_for(info)
            view = tensor_view(buffer, info)
            param = params.get(info.name)
            if param is None or param.shape != view.shape or param.dtype != view.dtype:
                remap.append((info.name, view))
                continue
            if param.device.type == "cpu" and self.config.zero_copy:
                param.data = view
            elif param.device.type == "cuda":
                if side_stream is None:
                    side_stream = torch.cuda.Stream()
                with torch.cuda.stream(side_stream):
                    param.data.copy_(view, non_blocking=True)
                copied += info.size
            else:
                param.data.copy_(view)
                copied += info.size
            adopted.add(info.name)
        if side_stream is not None:
            side_stream.synchronize()
        loaded: set[str] = set()
        if remap:
            # Names the engine fuses or renames: let the model's own loader place them.
            result = model.load_weights(iter(remap))
            loaded = set(result) if result else {name for name, _ in remap}
        missing = sorted(set(params) - adopted - loaded)
        if missing:
            raise RuntimeError(
                f"model {manifest.name}: {len(missing)} parameters got no weights "
                f"(first: {missing[:3]}); the store's layout ({manifest.layout}) does not "
                f"match this engine's model; push the checkpoint again with this version"
            )
        return {
            "adopted_zero_copy": len(adopted) if self.config.zero_copy else 0,
            "remapped": len(remap),
            "copied_bytes": copied,
        }
