"""Checkpoint → store layout: tensor order and, for known architectures, vLLM's fused names.

vLLM's Llama-family models keep q/k/v projections as one ``qkv_proj`` parameter and
gate/up as one ``gate_up_proj``. Storing them already fused (row-major concatenation along
dim 0, which is plain byte concatenation) lets a worker adopt each parameter straight from
shared memory, with no copy and no repacking. vLLM's stock loader also reads these names
unchanged, so the same file serves the serverless-vLLM baseline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from hydraserve.store.manifest import layer_of
from hydraserve.store.safetensors_format import TensorSlot

# Architectures whose vLLM implementation fuses q/k/v and gate/up with TP=1 layouts
# equal to the concatenation of the checkpoint tensors.
FUSABLE_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})

_FUSIONS = (
    (re.compile(r"^(.*)\.(q|k|v)_proj\.(weight|bias)$"), "qkv_proj", ("q", "k", "v")),
    (re.compile(r"^(.*)\.(gate|up)_proj\.(weight|bias)$"), "gate_up_proj", ("gate", "up")),
)


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of the store file and the checkpoint slots it is made of (concatenated)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sources: tuple[TensorSlot, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.sources)


def _order_key(name: str) -> tuple[int, int, str]:
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0, 0, name) if "embed" in name else (2, 0, name)


def plan_layout(
    slots: list[TensorSlot], architecture: str
) -> tuple[Literal["vllm", "hf"], list[OutputTensor]]:
    """Decide the store layout ('vllm' or 'hf') and the ordered output tensors."""
    by_name = {s.name: s for s in slots}
    fuse = architecture in FUSABLE_ARCHITECTURES
    outputs: list[OutputTensor] = []
    consumed: set[str] = set()
    if fuse:
        for slot in slots:
            for pattern, fused, parts in _FUSIONS:
                match = pattern.match(slot.name)
                if not match or slot.name in consumed:
                    continue
                prefix, kind = match.group(1), match.group(3)
                names = [f"{prefix}.{p}_proj.{kind}" for p in parts]
                missing = [n for n in names if n not in by_name]
                if missing:
                    raise LayoutError(f"cannot fuse {fused}: checkpoint lacks {missing}")
                members = tuple(by_name[n] for n in names)
                dtypes = {m.dtype for m in members}
                trailing = {m.shape[1:] for m in members}
                if len(dtypes) != 1 or len(trailing) != 1:
                    raise LayoutError(f"cannot fuse {names}: dtypes or trailing dims differ")
                rows = sum(m.shape[0] for m in members)
                outputs.append(
                    OutputTensor(
                        f"{prefix}.{fused}.{kind}",
                        members[0].dtype,
                        (rows, *members[0].shape[1:]),
                        members,
                    )
                )
                consumed.update(names)
    for slot in slots:
        if slot.name not in consumed:
            outputs.append(OutputTensor(slot.name, slot.dtype, slot.shape, (slot,)))
    outputs.sort(key=lambda o: _order_key(o.name))
    return ("vllm" if fuse else "hf"), outputs
