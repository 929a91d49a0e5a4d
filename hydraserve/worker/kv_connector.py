"""HydraServe's vLLM KV connector: a request's KV cache moves with it between engines.

Loaded through vLLM's own plugin point (``--kv-transfer-config`` with
``kv_connector_module_path``; vLLM is not patched). Both roles in one class:

* **Producer** (the pipeline being consolidated). A request the gateway may move carries
  ``kv_transfer_params: {"hydraserve_save": key}``. When it is *aborted* (the gateway closed
  the stream to move it), the scheduler keeps its blocks (``request_finished`` returns
  True) and writes which tokens they hold; in the next step every worker (each pipeline
  stage, for its own layers) copies those blocks into the node's shared memory and reports
  the save finished, and the blocks are freed. Requests that finish normally save nothing.
* **Consumer** (the standalone engine). The continuation carries
  ``{"hydraserve_load": key}``: the scheduler reports the longest saved prefix of its prompt
  (whole blocks; it waits up to ``wait_seconds`` for the save to complete, else recomputes
  everything) as externally computed, and the worker copies the blocks into the request's
  KV blocks before the forward pass. Only the rest of the prompt is computed.

Correctness does not depend on the transfer: a missing, partial or mismatched save means
fewer (or no) tokens are loaded and the engine computes them, as with recompute.
See :mod:`hydraserve.worker.kv_store` for the layout and docs/decisions/0400.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.v1.request import RequestStatus

from hydraserve.logs import get_logger
from hydraserve.worker.kv_store import KVStore, loadable_tokens

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

log = get_logger("worker.kv_connector")

SAVE_KEY = "hydraserve_save"
LOAD_KEY = "hydraserve_load"

_DTYPES = {str(t).removeprefix("torch."): t for t in (torch.bfloat16, torch.float16, torch.float32)}


@dataclass
class _Save:
    req_id: str
    key: str
    block_ids: list[int]


@dataclass
class _Load:
    req_id: str
    key: str
    block_ids: list[int]  # the request's blocks, from position 0
    first_block: int  # load saved blocks [first_block, first_block + blocks)
    blocks: int


@dataclass
class HydraServeKVMetadata(KVConnectorMetadata):
    saves: list[_Save] = field(default_factory=list)
    loads: list[_Load] = field(default_factory=list)


@dataclass
class _Pending:
    key: str
    computed: int
    tokens: int


class HydraServeKVConnector(KVConnectorBase_V1):
    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config or {}
        self._store = KVStore(Path(extra.get("store_dir", "/dev/shm/hydraserve/kv")))
        self._wait_seconds = float(extra.get("wait_seconds", 3.0))
        self._max_age_seconds = float(extra.get("max_age_seconds", 120.0))
        self._block_size = int(vllm_config.cache_config.block_size)
        self._layers = [
            name for group in kv_cache_config.kv_cache_groups for name in group.layer_names
        ]
        # scheduler side
        self._pending: dict[str, _Pending] = {}  # matched, waiting for their blocks
        self._loads: dict[str, _Pending] = {}  # allocated, load in the next step
        self._saves: list[_Save] = []
        self._waiting_since: dict[str, float] = {}
        self._last_sweep = 0.0
        # worker side
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._block_dim = 0
        self._saved_now: set[str] = set()

    # --- scheduler side ------------------------------------------------------------------

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        key = params.get(LOAD_KEY)
        if not isinstance(key, str):
            return 0, False
        saved = self._store.saved(key)
        complete = saved is not None and set(self._layers) <= self._store.complete_layers(key)
        if not complete:
            started = self._waiting_since.setdefault(request.request_id, time.monotonic())
            if time.monotonic() - started < self._wait_seconds:
                return None, False  # the producer is still saving: ask again next step
            log.warning("kv.load_gave_up", request=request.request_id, key=key,
                        waited_s=self._wait_seconds)  # fmt: skip
            self._waiting_since.pop(request.request_id, None)
            return 0, False
        self._waiting_since.pop(request.request_id, None)
        assert saved is not None
        tokens = loadable_tokens(
            saved, list(request.prompt_token_ids or []), self._block_size, num_computed_tokens
        )
        if tokens > 0:
            self._pending[request.request_id] = _Pending(key, num_computed_tokens, tokens)
        return tokens, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        pending = self._pending.pop(request.request_id, None)
        if pending is not None and num_external_tokens > 0:
            pending.tokens = num_external_tokens
            self._loads[request.request_id] = pending

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = HydraServeKVMetadata(saves=self._saves)
        self._saves = []
        for new in scheduler_output.scheduled_new_reqs:
            pending = self._loads.pop(new.req_id, None)
            if pending is None:
                continue
            meta.loads.append(
                _Load(
                    req_id=new.req_id,
                    key=pending.key,
                    block_ids=list(new.block_ids[0]),
                    first_block=pending.computed // self._block_size,
                    blocks=pending.tokens // self._block_size,
                )
            )
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params or {}
        load_key = params.get(LOAD_KEY)
        if isinstance(load_key, str):
            self._store.remove(load_key)  # loaded (or given up on): nobody needs it now
        key = params.get(SAVE_KEY)
        if not isinstance(key, str) or request.status != RequestStatus.FINISHED_ABORTED:
            return False, None
        tokens = min(request.num_computed_tokens, len(request.all_token_ids))
        blocks = min(tokens // self._block_size, len(block_ids))
        if blocks == 0:
            return False, None
        self._store.begin(
            key, list(request.all_token_ids[: blocks * self._block_size]), self._block_size
        )
        self._saves.append(_Save(request.request_id, key, list(block_ids[:blocks])))
        now = time.time()
        if now - self._last_sweep > self._max_age_seconds:
            self._last_sweep = now
            self._store.sweep(self._max_age_seconds, now)
        # Keep the blocks until every worker has copied them out (get_finished).
        return True, None

    # --- worker side ---------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._kv_caches = dict(kv_caches)
        num_blocks = int(self._kv_cache_config.num_blocks)
        sample = next(iter(self._kv_caches.values()), None)
        if sample is not None:
            # Most backends put blocks first (the CPU one: [blocks, kv heads, block, 2*head]);
            # some put K/V first ([2, blocks, ...]).
            dims = [d for d, size in enumerate(sample.shape) if size == num_blocks]
            self._block_dim = dims[0] if dims else 0

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, HydraServeKVMetadata)
        for load in meta.loads:
            self._load(load)

    def _load(self, load: _Load) -> None:
        started = time.perf_counter()
        moved = 0
        for layer, cache in self._kv_caches.items():
            try:
                data, shape, dtype = self._store.layer(load.key, layer)
            except FileNotFoundError:
                log.error("kv.layer_missing", key=load.key, layer=layer)
                continue
            saved = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
            saved = saved.view(_DTYPES[dtype]).reshape(shape)
            source = saved.narrow(self._block_dim, load.first_block, load.blocks)
            target = torch.tensor(
                load.block_ids[load.first_block : load.first_block + load.blocks],
                dtype=torch.long,
            )
            cache.index_copy_(self._block_dim, target, source.to(cache.dtype))
            moved += source.numel() * source.element_size()
        log.info("kv.loaded", key=load.key, blocks=load.blocks, bytes=moved,
                 ms=round((time.perf_counter() - started) * 1000, 2))  # fmt: skip

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return None  # saves happen once, for aborted requests (wait_for_save)

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, HydraServeKVMetadata)
        for save in meta.saves:
            started = time.perf_counter()
            index = torch.tensor(save.block_ids, dtype=torch.long)
            moved = 0
            for layer, cache in self._kv_caches.items():
                blocks = cache.index_select(self._block_dim, index).contiguous()
                raw = blocks.view(torch.uint8).numpy().tobytes()
                self._store.write_layer(
                    save.key,
                    layer,
                    raw,
                    list(blocks.shape),
                    str(blocks.dtype).removeprefix("torch."),
                )
                moved += len(raw)
            self._store.finish(save.key, self._kv_caches)
            self._saved_now.add(save.req_id)
            log.info("kv.saved", key=save.key, blocks=len(save.block_ids), bytes=moved,
                     ms=round((time.perf_counter() - started) * 1000, 2))  # fmt: skip

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done, self._saved_now = self._saved_now, set()
        return (done or None), None
