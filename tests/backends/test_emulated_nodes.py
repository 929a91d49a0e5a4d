"""How an emulated cluster's nodes get this machine's cores (no namespaces needed)."""

from __future__ import annotations

import pytest

from hydraserve.emulation.nodes import node_cores


def test_nodes_get_disjoint_cores_when_there_are_enough() -> None:
    assert node_cores([3, 2, 1, 0], 2) == [(0, 1), (2, 3)]
    assert node_cores(range(4), 2, at_least=2) == [(0, 1), (2, 3)]
    assert node_cores(range(2), 2) == [(0,), (1,)]


def test_nodes_share_cores_when_a_tensor_parallel_stage_needs_more_than_its_share() -> None:
    # Two cores, two nodes, tp 2: each node gets both (one OpenMP bind per tensor rank).
    assert node_cores([0, 1], 2, at_least=2) == [(0, 1), (0, 1)]
    # Three nodes on four cores, tp 2: windows of two, round-robin.
    assert node_cores(range(4), 3, at_least=2) == [(0, 1), (2, 3), (0, 1)]
    # One core: every node has it (the ranks then share it).
    assert node_cores([5], 2, at_least=2) == [(5,), (5,)]
    # Fewer cores than nodes, tp 1: one core each, as before.
    assert node_cores([0, 1], 3) == [(0,), (1,), (0,)]


def test_no_cores_is_an_error() -> None:
    with pytest.raises(ValueError, match="no cores"):
        node_cores([], 2)
