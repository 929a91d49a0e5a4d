"""The store layout learned from the engine: what each pipeline rank holds and how to fill it.

At push time a probe (:mod:`hydraserve.worker.layout_probe`, which runs vLLM's own model
code on the meta device) builds the model once per (pipeline size, rank) and records every
copy its ``load_weights`` makes from a checkpoint tensor into a parameter. This module turns
those records into the store layout, with no engine and no naming rules:

* a parameter whose bytes are whole checkpoint tensors laid end to end (fused q/k/v,
  gate/up, an MoE expert stack, or simply one tensor) becomes one **unit** of the store
  file, written in that order, which a worker adopts without a copy;
* every other checkpoint tensor is a unit of its own, under its own name, that the
  worker hands to the model's ``load_weights`` (the copy path: the engine repacks it);
* a rank's stage is exactly the units its model's parameters took bytes from.

The records and the plan are the wire contract between the probe (in a subprocess) and
the store; both sides import them from here.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from pydantic import BaseModel, Field

from hydraserve.store.manifest import StageInfo, TensorInfo, merge_ranges


class CopyRecord(BaseModel):
    """One copy the engine's ``load_weights`` made from a checkpoint tensor."""

    checkpoint: str
    param: str | None = Field(
        description="The engine parameter written (None: a buffer or a temporary)."
    )
    dst_offset: int = Field(description="First element written, within the parameter.")
    numel: int
    src_offset: int = Field(description="First element read, within the checkpoint tensor.")
    linear: bool = Field(
        description="Plain bytes: source and destination contiguous, same dtype, the source "
        "a view of the checkpoint tensor (no transpose, no conversion)."
    )


class ParamShape(BaseModel):
    shape: list[int]
    dtype: str  # safetensors spelling: BF16, F16, F32


class RankProbe(BaseModel):
    """What the engine builds and loads on one rank of one pipeline size."""

    pp: int
    rank: int
    params: dict[str, ParamShape]
    copies: list[CopyRecord]
    tp: int = 1
    tp_rank: int = 0


class EngineProbe(BaseModel):
    engine: str = Field(description="The engine and version probed, e.g. 'vllm 0.32.0'.")
    layer_partitions: dict[int, list[int]] = Field(
        description="Layers per rank for each pipeline size (VLLM_PP_LAYER_PARTITION)."
    )
    ranks: list[RankProbe]

    def rank(self, pp: int, rank: int) -> RankProbe:
        for probe in self.ranks:
            if probe.pp == pp and probe.rank == rank:
                return probe
        raise KeyError(f"no probe of pp={pp} rank={rank}")


@dataclass(frozen=True)
class SourceSlice:
    """Elements [start, start + numel) of a checkpoint tensor."""

    checkpoint: str
    start: int
    numel: int


@dataclass(frozen=True)
class Unit:
    """A tensor of the store file: an engine parameter (zero copy) or a checkpoint tensor."""

    name: str
    sources: tuple[SourceSlice, ...]
    param: str | None  # the parameter it is adopted as; None: handed to load_weights


def _tiles(shape: ParamShape, copies: list[CopyRecord]) -> list[SourceSlice] | None:
    """The parameter's bytes as checkpoint slices in order, if copies tile it exactly."""
    total = 1
    for d in shape.shape:
        total *= d
    ordered = sorted(copies, key=lambda c: c.dst_offset)
    position = 0
    slices: list[SourceSlice] = []
    for copy in ordered:
        if not copy.linear or copy.dst_offset != position:
            return None  # repacked, overlapping or with a gap
        last = slices[-1] if slices else None
        if (
            last
            and last.checkpoint == copy.checkpoint
            and last.start + last.numel == copy.src_offset
        ):
            slices[-1] = SourceSlice(last.checkpoint, last.start, last.numel + copy.numel)
        else:
            slices.append(SourceSlice(copy.checkpoint, copy.src_offset, copy.numel))
        position += copy.numel
    return slices if position == total else None


ITEMSIZE = {"BF16": 2, "F16": 2, "F32": 4}


def adoptable_bytes(probe: RankProbe) -> tuple[int, int]:
    """(bytes of this rank's parameters that are checkpoint slices laid end to end, all
    parameter bytes). With tensor parallelism a shard of a column-parallel weight is such a
    slice, a row-parallel one is not (every row contributes a strided piece): what a store
    laid out per (tp, rank) could hand over without a copy."""
    by_param: dict[str, list[CopyRecord]] = defaultdict(list)
    for copy in probe.copies:
        if copy.param is not None:
            by_param[copy.param].append(copy)
    adoptable = total = 0
    for name, shape in probe.params.items():
        size = ITEMSIZE.get(shape.dtype, 2)
        for d in shape.shape:
            size *= d
        total += size
        if by_param.get(name) and _tiles(shape, by_param[name]) is not None:
            adoptable += size
    return adoptable, total


def plan_units(whole: RankProbe, checkpoint: dict[str, tuple[int, str]]) -> list[Unit]:
    """Store units from the single-rank probe.

    ``checkpoint``: each checkpoint tensor's (number of elements, dtype). A parameter is a
    zero-copy unit when its copies tile it with whole checkpoint tensors of its own dtype,
    each used by no other parameter; the rest of the checkpoint passes through by name.
    Checkpoint tensors the engine never reads (a tied head, buffers it recomputes) stay
    in the file, in no stage.
    """
    by_param: dict[str, list[CopyRecord]] = defaultdict(list)
    readers: dict[str, set[str | None]] = defaultdict(set)
    for copy in whole.copies:
        readers[copy.checkpoint].add(copy.param)
        if copy.param is not None:
            by_param[copy.param].append(copy)
    units: list[Unit] = []
    taken: set[str] = set()
    for param, copies in by_param.items():
        shape = whole.params[param]
        slices = _tiles(shape, copies)
        if slices is None:
            continue
        names = {s.checkpoint for s in slices}
        whole_tensors = all(
            sum(s.numel for s in slices if s.checkpoint == n) == checkpoint[n][0]
            and len([s for s in slices if s.checkpoint == n]) == 1
            and readers[n] == {param}
            and checkpoint[n][1] == shape.dtype
            for n in names
        )
        if whole_tensors:
            units.append(Unit(param, tuple(slices), param))
            taken.update(names)
    for name, (count, _) in checkpoint.items():
        if name not in taken:
            units.append(Unit(name, (SourceSlice(name, 0, count),), None))
    return units


def stage_units(probe: RankProbe, units: list[Unit]) -> tuple[list[str], list[str]]:
    """(units this rank needs, parameters it builds that nothing fills)."""
    by_checkpoint = {s.checkpoint: u for u in units for s in u.sources}
    needed: set[str] = set()
    filled: set[str] = set()
    for copy in probe.copies:
        unit = by_checkpoint[copy.checkpoint]
        needed.add(unit.name)
        if copy.param is not None:
            filled.add(copy.param)
    unfilled = sorted(set(probe.params) - filled)
    return [u.name for u in units if u.name in needed], unfilled


def order_units(whole: RankProbe, units: list[Unit]) -> list[Unit]:
    """Units in the order the engine registers the parameters they fill (embeddings,
    layer 0 … layer N-1, final norm and head for the usual decoder), so a contiguous range
    of layers is a contiguous range of bytes. Units no parameter reads go last."""
    position = {name: i for i, name in enumerate(whole.params)}
    # Where a checkpoint tensor lands first: (parameter's position, offset inside it).
    landing: dict[str, tuple[int, int]] = {}
    for copy in whole.copies:
        if copy.param is not None:
            at = (position[copy.param], copy.dst_offset)
            landing[copy.checkpoint] = min(landing.get(copy.checkpoint, at), at)
    unread = (len(position), 0)

    def key(unit: Unit) -> tuple[tuple[int, int], str]:
        if unit.param is not None:
            return (position[unit.param], 0), unit.name
        return landing.get(unit.sources[0].checkpoint, unread), unit.name

    return sorted(units, key=key)


def layer_partitions(
    unit_bytes: list[tuple[int | None, int]], num_layers: int, max_pp: int
) -> dict[int, list[int]]:
    """Layers per rank for pp = 1..max_pp, balanced by bytes.

    ``unit_bytes``: (decoder layer or None, size) per unit in file order; units outside
    the layers count toward the first stage before the first layer, the last after it.
    """
    from hydraserve.store.partition import balanced_layer_ranges

    per_layer = [0] * num_layers
    first = last = 0
    seen_layer = False
    for layer, size in unit_bytes:
        if layer is not None:
            per_layer[layer] += size
            seen_layer = True
        elif seen_layer:
            last += size
        else:
            first += size
    return {
        pp: [hi - lo for lo, hi in balanced_layer_ranges(per_layer, first, last, pp)]
        for pp in range(1, min(max_pp, num_layers) + 1)
    }


def engine_partitions(
    probe: EngineProbe, units: list[Unit], tensors: list[TensorInfo]
) -> dict[int, list[StageInfo]]:
    """Each rank's stage: the layers the engine builds there and exactly the store
    tensors its parameters take bytes from."""
    by_name = {t.name: t for t in tensors}
    partitions: dict[int, list[StageInfo]] = {}
    for pp, layers in sorted(probe.layer_partitions.items()):
        stages = []
        start = 0
        for rank, count in enumerate(layers):
            needed, unfilled = stage_units(probe.rank(pp, rank), units)
            members = [by_name[n] for n in needed]
            stages.append(
                StageInfo(
                    rank=rank,
                    start_layer=start,
                    end_layer=start + count,
                    tensors=needed,
                    ranges=merge_ranges([(t.offset, t.end) for t in members]),
                    unfilled=unfilled,
                )
            )
            start += count
        partitions[pp] = stages
    return partitions
