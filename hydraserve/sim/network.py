"""Fetch flows from the model store to nodes, with max-min fair bandwidth sharing.

Every flow crosses two links: its node's NIC and the store's aggregate uplink. Rates are
max-min fair across flows of the same priority; low-priority (consolidation) flows get
only what the high-priority ones leave. Rates change only when a flow starts or ends, so
the simulator re-plans completion events exactly then.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from hydraserve.planner import InflightFetch


@dataclass(slots=True, eq=False)
class Flow:
    node: int
    bytes_left: float
    low_priority: bool
    deadline: float  # absolute simulated time by which it should finish (inf: none)
    on_done: Callable[[float], None]
    rate: float = 0.0
    updated_at: float = 0.0
    version: int = 0
    done: bool = False

    def eta(self) -> float:
        return self.updated_at + self.bytes_left / self.rate if self.rate > 0 else math.inf


def water_fill(caps: list[float], capacity: float) -> list[float]:
    """Max-min fair rates for flows with individual caps sharing ``capacity``."""
    n = len(caps)
    if n == 0:
        return []
    if capacity == math.inf or sum(caps) <= capacity:
        return list(caps)
    order = sorted(range(n), key=caps.__getitem__)
    rates = [0.0] * n
    remaining, left = capacity, n
    for position, i in enumerate(order):
        level = remaining / left
        if caps[i] <= level:
            rates[i] = caps[i]
            remaining -= caps[i]
            left -= 1
        else:
            for j in order[position:]:
                rates[j] = level
            break
    return rates


@dataclass
class FlowNetwork:
    nic_bytes_per_s: list[float]  # per node
    store_bytes_per_s: float | None
    # Dicts, not sets: insertion order keeps runs deterministic (sets of objects iterate
    # in address order).
    flows: dict[Flow, None] = field(default_factory=dict)
    by_node: dict[int, dict[Flow, None]] = field(default_factory=dict)
    bytes_moved: float = 0.0

    def settle(self, now: float) -> None:
        """Advance every flow's bytes to ``now`` at its current rate."""
        for flow in self.flows:
            if now > flow.updated_at:
                moved = min(flow.bytes_left, flow.rate * (now - flow.updated_at))
                flow.bytes_left -= moved
                self.bytes_moved += moved
                flow.updated_at = now

    def add(
        self, now: float, node: int, nbytes: float, low_priority: bool, deadline: float,
        on_done: Callable[[float], None],
    ) -> tuple[Flow, list[Flow]]:  # fmt: skip
        """Start a flow; returns it and the flows whose rate changed (incl. the new one)."""
        self.settle(now)
        flow = Flow(node, float(nbytes), low_priority, deadline, on_done, updated_at=now)
        self.flows[flow] = None
        self.by_node.setdefault(node, {})[flow] = None
        return flow, self.reallocate()

    def remove(self, now: float, flow: Flow) -> list[Flow]:
        """Finish or cancel a flow; returns the flows whose rate changed."""
        self.settle(now)
        flow.done = True
        self.flows.pop(flow, None)
        peers = self.by_node.get(flow.node)
        if peers is not None:
            peers.pop(flow, None)
            if not peers:
                del self.by_node[flow.node]
        return self.reallocate()

    def reallocate(self) -> list[Flow]:
        """Recompute every rate; returns the flows whose rate changed."""
        store = math.inf if self.store_bytes_per_s is None else self.store_bytes_per_s
        high = [f for f in self.flows if not f.low_priority]
        low = [f for f in self.flows if f.low_priority]
        used_at_node: dict[int, float] = {}
        new_rates = self._fill(high, store, used_at_node)
        # Low priority (consolidation) gets what high priority leaves, at NICs and store.
        new_rates.update(self._fill(low, store - sum(new_rates.values()), used_at_node))
        changed = []
        for f, rate in new_rates.items():
            if not math.isclose(rate, f.rate, rel_tol=1e-12, abs_tol=1e-9):
                f.rate = rate
                f.version += 1
                changed.append(f)
        return changed

    def _fill(
        self, group: list[Flow], store_left: float, used_at_node: dict[int, float]
    ) -> dict[Flow, float]:
        if not group:
            return {}
        count: dict[int, int] = {}
        for f in group:
            count[f.node] = count.get(f.node, 0) + 1
        caps = [
            max(0.0, self.nic_bytes_per_s[f.node] - used_at_node.get(f.node, 0.0)) / count[f.node]
            for f in group
        ]
        rates = dict(zip(group, water_fill(caps, max(0.0, store_left)), strict=True))
        for f, rate in rates.items():
            used_at_node[f.node] = used_at_node.get(f.node, 0.0) + rate
        return rates

    def inflight(self, node: int, now: float) -> tuple[InflightFetch, ...]:
        """What the planner sees of a node's fetches (call :meth:`settle` first)."""
        return tuple(
            InflightFetch(
                bytes_left=math.ceil(f.bytes_left),
                deadline_s=f.deadline - now,
                low_priority=f.low_priority,
            )
            for f in self.by_node.get(node, ())
        )

    def nodes_with_flows(self) -> Iterable[int]:
        return self.by_node.keys()
