"""The cluster-wide objects a reconcile pass reads: Nodes, every worker pod (what each GPU
has reserved) and the node prefetchers' pods.

Under kopf they come from indexes that watches keep current (no LIST per pass, decision
0202); :class:`ListedInventory` lists them instead, for a reconciler used without kopf and
for an operator that does not watch the prefetchers' namespace. A worker pod this operator
just created is counted until the watch delivers it, so two passes in a row do not give the
same GPU memory twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from hydraserve.kube.client import KubeClient, path_of
from hydraserve.operator.naming import APP_NAME, MANAGED_BY, MANAGED_BY_VALUE, WORKER_APP
from hydraserve.operator.settings import OperatorSettings

Obj = dict[str, Any]
WORKER_LABELS = {MANAGED_BY: MANAGED_BY_VALUE, APP_NAME: WORKER_APP}
# How long a created pod is counted without the watch having shown it (a watch delivers
# within milliseconds; a pod deleted by someone else meanwhile holds memory this long).
RECENT_SECONDS = 10.0


class Inventory(Protocol):
    async def nodes(self) -> list[Obj]: ...

    async def worker_pods(self) -> list[Obj]: ...

    async def prefetcher_pods(self) -> list[Obj]: ...

    def created(self, pod: Obj) -> None:
        """A worker pod this operator just created (before any watch reports it)."""

    def deleted(self, namespace: str, name: str) -> None:
        """A worker pod this operator just deleted."""


class ListedInventory:
    def __init__(self, client: KubeClient, settings: OperatorSettings) -> None:
        self.client = client
        self.settings = settings

    async def nodes(self) -> list[Obj]:
        return await self.client.list(path_of("v1", "nodes"))

    async def worker_pods(self) -> list[Obj]:
        return await self.client.list(path_of("v1", "pods"), WORKER_LABELS)

    async def prefetcher_pods(self) -> list[Obj]:
        return await self.client.list(
            path_of("v1", "pods", self.settings.prefetcher_namespace),
            self.settings.prefetcher_labels,
        )

    def created(self, pod: Obj) -> None:
        pass  # the next LIST shows it

    def deleted(self, namespace: str, name: str) -> None:
        pass


def _values(index: Mapping[Any, Iterable[Obj]]) -> list[Obj]:
    return [obj for store in index.values() for obj in store]


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return str(meta.get("namespace")), str(meta.get("name"))


class IndexedInventory:
    """Reads kopf indexes (mappings of key -> collection of bodies)."""

    def __init__(
        self,
        nodes: Mapping[Any, Iterable[Obj]],
        workers: Mapping[Any, Iterable[Obj]],
        prefetchers: Mapping[Any, Iterable[Obj]] | None,
        listed: ListedInventory,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nodes = nodes
        self._workers = workers
        self._prefetchers = prefetchers
        self._listed = listed
        self._clock = clock
        self._recent: dict[tuple[str, str], tuple[float, Obj]] = {}

    async def nodes(self) -> list[Obj]:
        return _values(self._nodes)

    async def worker_pods(self) -> list[Obj]:
        pods = _values(self._workers)
        seen = {_key(p) for p in pods}
        now = self._clock()
        for key, (at, _) in list(self._recent.items()):
            if key in seen or now - at > RECENT_SECONDS:
                del self._recent[key]
        return pods + [pod for _, pod in self._recent.values()]

    async def prefetcher_pods(self) -> list[Obj]:
        if self._prefetchers is None:  # the operator does not watch their namespace
            return await self._listed.prefetcher_pods()
        return _values(self._prefetchers)

    def created(self, pod: Obj) -> None:
        self._recent[_key(pod)] = (self._clock(), pod)

    def deleted(self, namespace: str, name: str) -> None:
        self._recent.pop((namespace, name), None)
