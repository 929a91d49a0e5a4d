"""The model manifest: what a worker or prefetcher needs to fetch and verify any stage.

A model in the store is a directory ``<model-uri>/<revision>/`` holding:

* ``model.safetensors`` — every tensor, ordered embeddings → layer 0 … layer N-1 → final
  norm and LM head, so any contiguous layer range is a contiguous byte range;
* ``config.json``, tokenizer and generation files, copied from the checkpoint;
* ``manifest.json`` — this model: per tensor (name, dtype, shape, offset, size, sha256),
  and the stage partitions for pp = 1..4.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, Field

MANIFEST_NAME = "manifest.json"
WEIGHTS_NAME = "model.safetensors"
MANIFEST_FORMAT = 2
MAX_PP = 4
HEADER_UNIT = "__header__"

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_of(tensor_name: str) -> int | None:
    """Decoder layer index of a tensor, or None for embeddings, final norm and head."""
    match = _LAYER_RE.search(tensor_name)
    return int(match.group(1)) if match else None


class FileInfo(BaseModel):
    name: str
    size: int
    sha256: str


class CheckpointPart(BaseModel):
    """A checkpoint tensor inside a store tensor (parts are laid end to end)."""

    name: str
    shape: list[int]


class TensorInfo(BaseModel):
    name: str
    dtype: str
    shape: list[int]
    offset: int = Field(description="Absolute byte offset in the weights file.")
    size: int
    sha256: str
    layer: int | None = None
    param: str | None = Field(
        default=None,
        description="The engine parameter these bytes are, as they are (adopted without a "
        "copy); None: a checkpoint tensor for the engine's own load_weights.",
    )
    parts: list[CheckpointPart] | None = Field(
        default=None,
        description="The checkpoint tensors it concatenates, when it is not one of its own "
        "name: what the engine's load_weights is given when it cannot adopt it.",
    )

    @property
    def end(self) -> int:
        return self.offset + self.size


class StageInfo(BaseModel):
    rank: int
    start_layer: int
    end_layer: int = Field(description="Exclusive.")
    tensors: list[str]
    ranges: list[tuple[int, int]] = Field(
        description="Byte ranges [start, end) of the weights file this stage needs, in order."
    )
    unfilled: list[str] = Field(
        default_factory=list,
        description="Parameters the engine builds on this rank but loads nothing into.",
    )

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.ranges)

    @property
    def num_layers(self) -> int:
        return self.end_layer - self.start_layer


class Manifest(BaseModel):
    format: int = MANIFEST_FORMAT
    name: str
    revision: str
    architecture: str
    layout: Literal["vllm", "hf"] = Field(
        description="'vllm': the engine's own parameters where they are checkpoint bytes "
        "laid end to end (adoptable without copies); 'hf': the checkpoint's own tensors."
    )
    engine: str | None = Field(
        default=None,
        description="The engine (and version) whose model code the layout and the stage "
        "contents were derived from, e.g. 'vllm 0.32.0'; None: from the checkpoint alone.",
    )
    dtype: str
    num_layers: int
    tie_word_embeddings: bool = False
    weights_file: str = WEIGHTS_NAME
    weights_size: int
    weights_sha256: str
    header_size: int = Field(description="Bytes of the safetensors header incl. its length.")
    header_sha256: str = Field(description="sha256 of those header bytes.")
    weights_parts: list[tuple[int, int]] = Field(
        default_factory=list,
        description="The weights file stored as several objects: each part's [start, end) "
        "in the file (empty: one object). Parts keep every request small for the store.",
    )
    files: list[FileInfo] = Field(description="Config and tokenizer files, copied as they are.")
    tensors: list[TensorInfo]
    partitions: dict[int, list[StageInfo]]

    @property
    def total_bytes(self) -> int:
        return sum(t.size for t in self.tensors)

    @property
    def zero_copy_bytes(self) -> int:
        """Bytes the engine adopts as they are (the rest goes through its load_weights)."""
        return sum(t.size for t in self.tensors if t.param is not None)

    @property
    def zero_copy_share(self) -> float:
        return self.zero_copy_bytes / max(1, self.total_bytes)

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(f"model {self.name}: no tensor named {name}")

    def stage(self, pp: int, rank: int) -> StageInfo:
        if pp not in self.partitions:
            raise KeyError(
                f"model {self.name} has no partition for pp={pp} (has {sorted(self.partitions)})"
            )
        stages = self.partitions[pp]
        if not 0 <= rank < len(stages):
            raise KeyError(f"model {self.name}: pp={pp} has no rank {rank}")
        return stages[rank]

    def part_key(self, index: int) -> str:
        return self.part_key_for(self.weights_file, index)

    @staticmethod
    def part_key_for(weights_file: str, index: int) -> str:
        return f"{weights_file}.parts/{index:05d}"

    def parts_overlapping(self, start: int, end: int) -> list[tuple[str, int, int]]:
        """(object key, start, end within that object) covering file bytes [start, end)."""
        if not self.weights_parts:
            return [(self.weights_file, start, end)]
        out = []
        for index, (part_start, part_end) in enumerate(self.weights_parts):
            lo, hi = max(start, part_start), min(end, part_end)
            if lo < hi:
                out.append((self.part_key(index), lo - part_start, hi - part_start))
        return out

    def header(self) -> TensorInfo:
        """The safetensors header as a verifiable unit (every fetch carries it, so a node's
        shared-memory file is always a valid safetensors file)."""
        return TensorInfo(
            name=HEADER_UNIT,
            dtype="U8",
            shape=[self.header_size],
            offset=0,
            size=self.header_size,
            sha256=self.header_sha256,
        )

    def fetch_ranges(self, pp: int | None, rank: int | None) -> list[tuple[int, int]]:
        """Byte ranges one fetch moves: the header, then a stage's tensors (or all)."""
        stage = self.stage(pp, rank) if pp is not None and rank is not None else self.stage(1, 0)
        return merge_ranges([(0, self.header_size), *stage.ranges])

    def layer_bytes(self) -> list[int]:
        sizes = [0] * self.num_layers
        for t in self.tensors:
            if t.layer is not None:
                sizes[t.layer] += t.size
        return sizes

    def layer_partition(self, pp: int) -> list[int]:
        """Layers per stage, in the form vLLM's ``VLLM_PP_LAYER_PARTITION`` expects."""
        return [s.num_layers for s in self.partitions[pp]]


def split_parts(size: int, part_bytes: int) -> list[tuple[int, int]]:
    """Fixed-size parts covering ``size`` bytes (one part when ``part_bytes`` is 0)."""
    if part_bytes <= 0 or size <= part_bytes:
        return []
    return [(start, min(start + part_bytes, size)) for start in range(0, size, part_bytes)]


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def build_partitions(
    tensors: list[TensorInfo], num_layers: int, tie_word_embeddings: bool, max_pp: int = MAX_PP
) -> dict[int, list[StageInfo]]:
    """Stage plans for pp = 1..min(max_pp, num_layers), from tensor names, sizes and offsets
    (Llama's per-rank modules: embeddings first, norm and head last). The store derives
    stages from the engine instead (``engine_layout``); this serves the simulator's
    catalog and checkpoints pushed without an engine (pp 1 only)."""
    from hydraserve.store.partition import balanced_layer_ranges

    layer_sizes = [0] * num_layers
    first: list[TensorInfo] = []
    last: list[TensorInfo] = []
    seen_layer = False
    for t in tensors:
        if t.layer is not None:
            layer_sizes[t.layer] += t.size
            seen_layer = True
        elif not seen_layer:
            first.append(t)
        else:
            last.append(t)
    # A tied LM head reads the embedding matrix on the last stage too.
    shared_embed = [t for t in first if "embed" in t.name] if tie_word_embeddings else []
    first_bytes = sum(t.size for t in first)
    last_bytes = sum(t.size for t in last) + sum(t.size for t in shared_embed)

    partitions: dict[int, list[StageInfo]] = {}
    for pp in range(1, min(max_pp, num_layers) + 1):
        stages = []
        for rank, (lo, hi) in enumerate(
            balanced_layer_ranges(layer_sizes, first_bytes, last_bytes, pp)
        ):
            members = [t for t in tensors if t.layer is not None and lo <= t.layer < hi]
            if rank == 0:
                members = first + members
            if rank == pp - 1:
                members = members + last + [t for t in shared_embed if t not in members]
            stages.append(
                StageInfo(
                    rank=rank,
                    start_layer=lo,
                    end_layer=hi,
                    tensors=[t.name for t in members],
                    ranges=merge_ranges([(t.offset, t.end) for t in members]),
                )
            )
        partitions[pp] = stages
    return partitions
