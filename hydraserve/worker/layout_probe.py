"""Ask the engine what each pipeline rank holds: ``python -m hydraserve.worker.layout_probe``.

For each pipeline size and rank, builds vLLM's own model for the checkpoint on the meta
device (no memory, no weights) with a stand-in pipeline group that tells the model which
rank it is, then runs the model's own ``load_weights`` over meta tensors shaped like the
checkpoint's and records every copy it makes (destination parameter and element range,
source element range, whether the bytes move unchanged). The store turns the records
into its layout (:mod:`hydraserve.store.engine_layout`).

It runs in a child process of ``hydraserve model push``: it initialises a one-process
distributed group and vLLM's global state, which must not leak into the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hydraserve.store.engine_layout import (
    CopyRecord,
    EngineProbe,
    ParamShape,
    RankProbe,
    layer_partitions,
    order_units,
    plan_units,
)
from hydraserve.store.manifest import MAX_PP, layer_of
from hydraserve.store.safetensors_format import read_file_header
from hydraserve.worker.views import TORCH_DTYPES

SAFETENSORS_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


class _StandInGroup:
    """A pipeline group that only says which rank this is: all a model reads to decide
    which layers and modules it builds. Everything else goes to the real group."""

    def __init__(self, real: Any, rank: int, size: int) -> None:
        self._real = real
        self.rank_in_group = rank
        self.world_size = size
        self.is_first_rank = rank == 0
        self.is_last_rank = rank == size - 1

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _CopyRecorder(TorchDispatchMode):  # type: ignore[misc]
    """Sees every ``copy_`` while ``load_weights`` runs (meta tensors keep their views'
    offsets and strides, so where bytes land is exact)."""

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params  # storage id -> parameter name
        self.checkpoint: str | None = None
        self.source_storage: int | None = None
        self.copies: list[CopyRecord] = []

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func is torch.ops.aten.copy_.default and self.checkpoint is not None:
            dst, src = args[0], args[1]
            same_source = src.untyped_storage()._cdata == self.source_storage
            self.copies.append(
                CopyRecord(
                    checkpoint=self.checkpoint,
                    param=self.params.get(dst.untyped_storage()._cdata),
                    dst_offset=dst.storage_offset(),
                    numel=dst.numel(),
                    src_offset=src.storage_offset() if same_source else -1,
                    linear=same_source
                    and dst.is_contiguous()
                    and src.is_contiguous()
                    and dst.dtype == src.dtype
                    and dst.numel() == src.numel(),
                )
            )
        return func(*args, **(kwargs or {}))


class Prober:
    def __init__(self, checkpoint_dir: Path, dtype: str) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.distributed import parallel_state
        from vllm.engine.arg_utils import EngineArgs

        self.checkpoint: dict[str, tuple[list[int], str]] = {}
        for path in sorted(checkpoint_dir.glob("*.safetensors")):
            _, slots, _ = read_file_header(path)
            for slot in slots:
                self.checkpoint[slot.name] = (list(slot.shape), slot.dtype)
        args = EngineArgs(
            model=str(checkpoint_dir),
            dtype=dtype,
            enforce_eager=True,
            load_format="dummy",
            max_model_len=256,
        )
        self.config = args.create_engine_config()
        self.num_layers = self.config.model_config.get_total_num_hidden_layers()
        self._state = parallel_state
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with set_current_vllm_config(self.config):
            parallel_state.init_distributed_environment(
                world_size=1,
                rank=0,
                distributed_init_method=f"tcp://127.0.0.1:{port}",
                local_rank=0,
                backend="gloo",
            )
            parallel_state.initialize_model_parallel(1, 1)

    def probe(
        self, pp: int, rank: int, partition: list[int], tp: int = 1, tp_rank: int = 0
    ) -> RankProbe:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.utils import initialize_model
        from vllm.utils.torch_utils import set_default_torch_dtype

        os.environ["VLLM_PP_LAYER_PARTITION"] = ",".join(map(str, partition))
        real, real_tp = self._state._PP, self._state._TP
        self._state._PP = _StandInGroup(real, rank, pp)  # type: ignore[assignment]
        if tp > 1:  # layers read their shard's size and index from the tensor group
            self._state._TP = _StandInGroup(real_tp, tp_rank, tp)  # type: ignore[assignment]
        # Attention layers register by name in the config: a fresh build must not clash.
        self.config.compilation_config.static_forward_context.clear()
        try:
            with (
                set_current_vllm_config(self.config),
                set_default_torch_dtype(self.config.model_config.dtype),
                torch.device("meta"),
            ):
                model = initialize_model(self.config)
            params = dict(model.named_parameters())
            recorder = _CopyRecorder({p.untyped_storage()._cdata: n for n, p in params.items()})

            def weights() -> Iterator[tuple[str, torch.Tensor]]:
                for name, (shape, dtype) in self.checkpoint.items():
                    tensor = torch.empty(shape, dtype=TORCH_DTYPES[dtype], device="meta")
                    recorder.checkpoint = name
                    recorder.source_storage = tensor.untyped_storage()._cdata
                    yield name, tensor
                recorder.checkpoint = None

            with recorder:
                model.load_weights(weights())
        finally:
            self._state._PP, self._state._TP = real, real_tp
        return RankProbe(
            pp=pp,
            rank=rank,
            tp=tp,
            tp_rank=tp_rank,
            params={
                n: ParamShape(shape=list(p.shape), dtype=SAFETENSORS_NAMES[p.dtype])
                for n, p in params.items()
            },
            copies=recorder.copies,
        )

    def run(self) -> EngineProbe:
        import vllm

        whole = self.probe(1, 0, [self.num_layers])
        sizes = {n: (_numel(shape), dtype) for n, (shape, dtype) in self.checkpoint.items()}
        units = order_units(whole, plan_units(whole, sizes))
        itemsize = {n: TORCH_DTYPES[d].itemsize for n, (_, d) in self.checkpoint.items()}
        unit_bytes = [
            (layer_of(u.name), sum(s.numel * itemsize[s.checkpoint] for s in u.sources))
            for u in units
        ]
        partitions = layer_partitions(unit_bytes, self.num_layers, MAX_PP)
        ranks = [whole]
        for pp, partition in partitions.items():
            if pp > 1:
                ranks.extend(self.probe(pp, rank, partition) for rank in range(pp))
        return EngineProbe(
            engine=f"vllm {vllm.__version__}", layer_partitions=partitions, ranks=ranks
        )


def _numel(shape: list[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("output", type=Path, help="Where to write the probe (JSON).")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--tp",
        type=int,
        default=1,
        help="Instead: probe one stage's tensor-parallel ranks (a JSON list of rank probes).",
    )
    args = parser.parse_args(argv)
    prober = Prober(args.checkpoint, args.dtype)
    if args.tp > 1:
        layers = [prober.num_layers]
        ranks = [prober.probe(1, 0, layers, args.tp, r).model_dump() for r in range(args.tp)]
        args.output.write_text(json.dumps(ranks))
        return
    args.output.write_text(prober.run().model_dump_json())


if __name__ == "__main__":
    main()
