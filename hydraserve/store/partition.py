"""Stage partitions: contiguous layer ranges balanced by bytes.

Stage 0 also holds the embeddings, the last stage the final norm and LM head, so those
bytes count toward the first and last stages' sizes when balancing. Pure functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache


def balanced_layer_ranges(
    layer_bytes: Sequence[int], first_extra: int, last_extra: int, pp: int
) -> list[tuple[int, int]]:
    """Split layers into ``pp`` contiguous non-empty ranges minimising the largest stage.

    Returns ``[(start, end), ...]`` half-open. Ties are broken toward fewer layers
    on the earlier stages (the earliest cut that reaches the optimum wins).
    """
    n = len(layer_bytes)
    if pp < 1:
        raise ValueError("pp must be >= 1")
    if pp > n:
        raise ValueError(f"cannot split {n} layers into {pp} stages")
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)

    def stage_cost(start: int, end: int, rank: int) -> int:
        cost = prefix[end] - prefix[start]
        if rank == 0:
            cost += first_extra
        if rank == pp - 1:
            cost += last_extra
        return cost

    @cache
    def best(start: int, rank: int) -> tuple[int, tuple[int, ...]]:
        # Minimal max-stage cost for layers[start:] on stages rank..pp-1, and the cut points.
        if rank == pp - 1:
            return stage_cost(start, n, rank), ()
        result: tuple[int, tuple[int, ...]] | None = None
        remaining_stages = pp - rank - 1
        for end in range(start + 1, n - remaining_stages + 1):
            rest_cost, rest_cuts = best(end, rank + 1)
            cost = max(stage_cost(start, end, rank), rest_cost)
            if result is None or cost < result[0]:
                result = (cost, (end, *rest_cuts))
        assert result is not None
        return result

    _, cuts = best(0, 0)
    bounds = [0, *cuts, n]
    return [(bounds[i], bounds[i + 1]) for i in range(pp)]
