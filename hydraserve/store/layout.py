"""Checkpoint → store file: which tensors, in which order, made of which checkpoint bytes.

With the engine at hand, the layout is the engine's own (:mod:`engine_layout`): each
parameter that is checkpoint tensors laid end to end (fused q/k/v, gate/up, MoE expert
stacks) is stored already concatenated under the parameter's name, so a worker adopts it
straight from shared memory; everything else keeps its checkpoint name. Without the engine
the checkpoint's tensors are stored as they are (``hf``) and every one takes the copy path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hydraserve.store.engine_layout import RankProbe, Unit
from hydraserve.store.manifest import layer_of
from hydraserve.store.safetensors_format import TensorSlot


class LayoutError(ValueError):
    pass


@dataclass(frozen=True)
class OutputTensor:
    """A tensor of the store file and the checkpoint slots it is made of (concatenated)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    sources: tuple[TensorSlot, ...]
    param: str | None = None  # the engine parameter it is adopted as (engine layout)

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.sources)

    @property
    def fused(self) -> bool:
        """Made of other checkpoint tensors than one of its own name."""
        return len(self.sources) > 1 or self.sources[0].name != self.name


def _order_key(name: str) -> tuple[int, int, str]:
    # Without the engine: embeddings, then layers, then the rest (by the usual names).
    layer = layer_of(name)
    if layer is not None:
        return (1, layer, name)
    return (0, 0, name) if "embed" in name else (2, 0, name)


def checkpoint_layout(slots: list[TensorSlot]) -> list[OutputTensor]:
    """The checkpoint's own tensors, embeddings → layers → the rest."""
    outputs = [OutputTensor(s.name, s.dtype, s.shape, (s,)) for s in slots]
    return sorted(outputs, key=lambda o: _order_key(o.name))


def engine_layout(
    units: list[Unit], whole: RankProbe, slots: Mapping[str, TensorSlot]
) -> list[OutputTensor]:
    """The store file's tensors from the engine's units, in the units' order."""
    outputs = []
    names: set[str] = set()
    for unit in units:
        if unit.name in names:
            raise LayoutError(f"two store tensors would be named {unit.name}")
        names.add(unit.name)
        members = tuple(slots[s.checkpoint] for s in unit.sources)
        if unit.param is None:
            outputs.append(OutputTensor(unit.name, members[0].dtype, members[0].shape, members))
            continue
        shape = whole.params[unit.param]
        outputs.append(
            OutputTensor(unit.name, shape.dtype, tuple(shape.shape), members, param=unit.param)
        )
    return outputs
