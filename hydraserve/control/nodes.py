"""What a node's prefetcher reports, as the planner's inputs for that node.

Both backends feed the planner from the same ``GET /v1/status`` answer
(:class:`~hydraserve.prefetcher.node.NodeStatus`): the whole models the node holds in host
memory (a cold start there loads from the cache, not over the network) and the fetches
using its link, with the deadline the planner gave each one when it was asked for (kept by
the prefetcher, so an operator restart does not forget it).
"""

from __future__ import annotations

from hydraserve.planner.profile import weights_key
from hydraserve.planner.types import InflightFetch
from hydraserve.prefetcher.node import NodeStatus
from hydraserve.prefetcher.shm import FetchState


def cached_models(status: NodeStatus | None) -> frozenset[str]:
    """Model keys (``weights_key``) whose whole, verified bytes the node holds."""
    if status is None:
        return frozenset()
    return frozenset(weights_key(m.uri, m.revision) for m in status.models if m.complete)


def inflight_fetches(status: NodeStatus | None, now: float) -> tuple[InflightFetch, ...]:
    """The fetches on the node's link with bytes left. A fetch asked for without a
    deadline counts as due now: it shares the link but no new fetch is refused for it."""
    if status is None:
        return ()
    fetches: list[InflightFetch] = []
    for holding in status.models:
        for fetch in holding.fetches.values():
            if fetch.state not in (FetchState.PENDING, FetchState.FETCHING):
                continue
            left = max(0, fetch.total - fetch.verified)
            if not left:
                continue
            due = fetch.deadline if fetch.deadline is not None else now
            fetches.append(
                InflightFetch(
                    bytes_left=left,
                    deadline_s=max(0.0, due - now),
                    low_priority=fetch.low_priority,
                )
            )
    return tuple(fetches)
