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

import math
import os
import threading
import time
from dataclasses import dataclass
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
from hydraserve.store.manifest import Manifest, StageInfo, TensorInfo
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
        description="In compiled mode and in pipeline stages, adopt the mapped stage at once so "
        "engine start-up (compilation, warm-up, KV cache, API) overlaps the fetch (only where "
        "post-load processing never reads weights).",
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
        stage = manifest.stage(pp, rank) if pp > 1 else manifest.stage(1, 0)
        plan = AdoptionPlan.for_engine(manifest, stage, _engine())
        if self._can_adopt_early(model_config, pp, manifest, source, params, plan):
            self._adopt_early(params, source, plan, timeline, started)
            return
        memory_before = process_memory()
        stats = self._adopt_all(model, params, manifest, source, plan)
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
        pp: int,
        manifest: Manifest,
        source: StageSource,
        params: dict[str, nn.Parameter],
        plan: AdoptionPlan,
    ) -> bool:
        """Early adoption is safe only if nothing serves before every byte is verified and
        nothing reads the weights meanwhile except to be discarded: on CPU, bf16 in the
        engine's own layout (no repacking after load), and an instance whose readiness
        waits for its fetches (every pipeline, and a compiled engine); an eager single
        stage streams instead and answers /health only after its last tensor."""
        if not (self.config.overlap_compile and self.config.zero_copy and plan.adopt):
            return False
        if model_config.enforce_eager and pp == 1:
            return False
        if manifest.dtype != "BF16" or manifest.layout != "vllm":
            return False
        if any(p.device.type != "cpu" for p in params.values()):
            return False
        targets = {plan.target(t): t for t in source.tensors}
        if None in targets or set(targets) != set(params) - plan.unfilled:
            return False
        return all(
            tuple(params[name].shape) == tuple(t.shape)
            and params[name].dtype == TORCH_DTYPES[t.dtype]
            for name, t in targets.items()
            if name is not None
        )

    def _adopt_early(
        self,
        params: dict[str, nn.Parameter],
        source: StageSource,
        plan: AdoptionPlan,
        timeline: Timeline,
        started: float,
    ) -> None:
        """Point every parameter at its (possibly still arriving) bytes, then verify in the
        background. The control plane marks the instance ready only once every stage's
        fetch is verified; if a fetch fails, this process exits rather than serve."""
        source.wait_started()
        buffer = source.buffer()
        for info in source.tensors:
            params[str(plan.target(info))].data = tensor_view(buffer, info)
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
        plan: AdoptionPlan,
    ) -> dict[str, Any]:
        source.wait_started()  # the weights file exists (full size) once a fetch is known
        buffer = source.buffer()
        adopted: set[str] = set()
        copied = 0
        side_stream = None
        remap: list[tuple[str, torch.Tensor]] = []
        for info in source.tensors:
            source.wait_for(info)
            view = tensor_view(buffer, info)
            target = plan.target(info)
            param = params.get(target) if target is not None else None
            if param is None or param.shape != view.shape or param.dtype != view.dtype:
                remap.extend(checkpoint_tensors(info, view))
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
            adopted.add(str(target))
        if side_stream is not None:
            side_stream.synchronize()
        loaded: set[str] = set()
        if remap:
            # What the engine repacks, renames or (another version) may hold differently:
            # its own loader places the checkpoint's tensors.
            result = model.load_weights(iter(remap))
            loaded = set(result) if result else {name for name, _ in remap}
        missing = sorted(set(params) - adopted - loaded - plan.unfilled)
        if missing:
            raise RuntimeError(
                f"model {manifest.name}: {len(missing)} parameters got no weights "
                f"(first: {missing[:3]}); the store's stages were derived with "
                f"{manifest.engine or 'no engine'} and this worker runs {_engine()}: push the "
                "checkpoint again with this engine version"
            )
        return {
            "adopted_zero_copy": len(adopted) if self.config.zero_copy else 0,
            "adopted_bytes": sum(t.size for t in source.tensors if plan.target(t) in adopted),
            "remapped": len(remap),
            "copied_bytes": copied,
        }


def _engine() -> str:
    import vllm

    return f"vllm {vllm.__version__}"


@dataclass(frozen=True)
class AdoptionPlan:
    """Which parameter each stored tensor is, for this worker's engine."""

    adopt: bool  # False: every tensor goes through the engine's load_weights
    unfilled: frozenset[str]  # parameters the engine itself leaves unloaded
    # A manifest from before the engine-derived layout names parameters directly.
    by_name: bool = False

    @classmethod
    def for_engine(cls, manifest: Manifest, stage: StageInfo, engine: str) -> AdoptionPlan:
        if manifest.engine is not None and manifest.engine != engine:
            log.warning(
                "layout.engine_mismatch",
                model=manifest.name,
                derived_with=manifest.engine,
                running=engine,
                action="every tensor takes the copy path through the engine's load_weights",
            )
            return cls(adopt=False, unfilled=frozenset())
        return cls(adopt=True, unfilled=frozenset(stage.unfilled), by_name=manifest.engine is None)

    def target(self, info: TensorInfo) -> str | None:
        if not self.adopt:
            return None
        return info.name if self.by_name else info.param


def checkpoint_tensors(info: TensorInfo, view: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint tensors a stored tensor is made of, as views (no copy)."""
    if not info.parts:
        return [(info.name, view)]
    flat = view.reshape(-1)
    out = []
    offset = 0
    for part in info.parts:
        count = math.prod(part.shape)
        out.append((part.name, flat[offset : offset + count].view(part.shape)))
        offset += count
    return out
