from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hydraserve.store.partition import balanced_layer_ranges


def brute_force_best(sizes: list[int], first: int, last: int, pp: int) -> int:
    n = len(sizes)
    best = None
    for cuts in itertools.combinations(range(1, n), pp - 1):
        bounds = [0, *cuts, n]
        costs = [sum(sizes[bounds[i] : bounds[i + 1]]) for i in range(pp)]
        costs[0] += first
        costs[-1] += last
        best = max(costs) if best is None else min(best, max(costs))
    assert best is not None
    return best


def test_even_layers_split_evenly_without_extras() -> None:
    assert balanced_layer_ranges([10] * 8, 0, 0, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]


def test_embeddings_push_layers_off_the_first_and_last_stage() -> None:
    # 8 equal layers, embeddings and head each worth two layers: stages 0 and 3 take fewer.
    ranges = balanced_layer_ranges([10] * 8, 20, 20, 4)
    assert ranges[0][1] - ranges[0][0] < 2 + 1
    assert ranges[-1][1] - ranges[-1][0] < 2 + 1
    assert ranges[0][0] == 0 and ranges[-1][1] == 8


def test_too_many_stages_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        balanced_layer_ranges([1, 1], 0, 0, 3)


@given(
    sizes=st.lists(st.integers(1, 100), min_size=1, max_size=9),
    first=st.integers(0, 200),
    last=st.integers(0, 200),
    pp=st.integers(1, 4),
)
def test_ranges_are_contiguous_cover_all_layers_and_are_optimal(
    sizes: list[int], first: int, last: int, pp: int
) -> None:
    if pp > len(sizes):
        return
    ranges = balanced_layer_ranges(sizes, first, last, pp)
    assert len(ranges) == pp
    assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
    for (_, end), (start, _) in itertools.pairwise(ranges):
        assert end == start
    assert all(end > start for start, end in ranges)
    costs = [sum(sizes[s:e]) for s, e in ranges]
    costs[0] += first
    costs[-1] += last
    assert max(costs) == brute_force_best(sizes, first, last, pp)
