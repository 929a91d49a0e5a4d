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

import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn
from vllm.config import ModelConfig
from vllm.config.load import LoadConfig
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from hydraserve.logs import get_logger
from hydraserve.prefetcher.shm import ModelShm
from hydraserve.store.manifest import Manifest
from hydraserve.worker.source import StageSource
from hydraserve.worker.timeline import Timeline

LOAD_FORMAT = "hydraserve"

TORCH_DTYPES = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I8": torch.int8,
    "U8": torch.uint8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}

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
        stats = self._adopt_all(model, manifest, source)
        Timeline(
            Path(self.config.timeline) if self.config.timeline else None,
            model=manifest.name,
            instance=self.config.instance,
            rank=rank,
        ).record(
            "weight_load",
            started,
            time.time(),
            waited_s=round(source.stats.waited_seconds, 4),
            **stats,
        )

    def _adopt_all(
        self, model: nn.Module, manifest: Manifest, source: StageSource
    ) -> dict[str, Any]:
        params = dict(model.named_parameters())
        buffer = source.buffer()
        adopted: set[str] = set()
        copied = 0
        side_stream = None
        remap: list[tuple[str, torch.Tensor]] = []
        for info in source.tensors:
            source.wait_for(info)
            dtype = TORCH_DTYPES[info.dtype]
            count = info.size // dtype.itemsize if info.size else 0
            view = torch.frombuffer(buffer, dtype=dtype, count=count, offset=info.offset)
            view = view.view(info.shape)
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
