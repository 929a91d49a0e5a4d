"""The gateway's cluster backend on Kubernetes: ServerlessModel objects and their status.

Reads come from an in-memory cache kept current by a watch (the gateway asks per request,
so it must not call the API server each time). Scaling patches the ``scale`` subresource
(``spec.replicas``); the operator does the rest and writes ``status.instances``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from hydraserve.api.models import (
    GROUP,
    PLURAL,
    VERSION,
    ServerlessModel,
    ServerlessModelSpec,
    SloAttainmentStatus,
)
from hydraserve.api.validation import spec_errors
from hydraserve.backends.base import ClusterBackend, ModelView, qualified_id, view_of
from hydraserve.kube.client import KubeClient, KubeError, path_of
from hydraserve.logs import get_logger

log = get_logger("gateway.kubernetes")

MODELS_API = f"{GROUP}/{VERSION}"
RECONNECT_DELAY_S = 1.0


def model_view(obj: Mapping[str, Any]) -> ModelView | None:
    """A ServerlessModel object as the gateway sees it (None if not even its name is usable)."""
    meta = obj.get("metadata") or {}
    raw_status = obj.get("status") or {}
    errors = spec_errors(obj.get("spec") or {})
    metadata = {"name": meta.get("name"), "namespace": meta.get("namespace", "default")}
    try:
        if errors is None:
            body = {"metadata": metadata, "spec": obj["spec"], "status": _known_status(raw_status)}
        else:
            # Keep the model listed (with its error) so that a request gets a useful answer.
            body = {"metadata": metadata, "spec": {"source": {"uri": "/invalid"}}}
        model = ServerlessModel.model_validate(body)
    except ValidationError as exc:
        log.warning("model.unusable", model=meta.get("name"), error=str(exc))
        return None
    return view_of(model, spec_error=errors, phase_written=bool(raw_status.get("phase")))


def _known_status(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Status as the models know it (tolerating fields a newer operator may add)."""
    from hydraserve.api.models import ServerlessModelStatus

    known = {f.alias or n for n, f in ServerlessModelStatus.model_fields.items()}
    status = {k: v for k, v in raw.items() if k in known}
    try:
        ServerlessModelStatus.model_validate(status)
    except ValidationError:
        return {}
    return status


class KubernetesBackend(ClusterBackend):
    """Models from ServerlessModel objects in one namespace, or in all (``namespace=None``).

    Models are keyed by their canonical id ``<namespace>/<name>`` (decision 0502): two
    tenants may use the same name; the gateway resolves bare names per caller.
    """

    def __init__(
        self,
        client: KubeClient,
        namespace: str | None = None,
        only_namespaces: frozenset[str] = frozenset(),
    ) -> None:
        self.client = client
        self.namespace = namespace
        # Watching all namespaces but serving a few (several namespaces, one watch).
        self.only_namespaces = only_namespaces
        self._views: dict[str, ModelView] = {}
        self._owners: dict[str, tuple[str, str]] = {}  # model id -> (namespace, name)
        self._changed: dict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self._task: asyncio.Task[None] | None = None
        self._synced = asyncio.Event()

    @property
    def _path(self) -> str:
        return path_of(MODELS_API, PLURAL, self.namespace)

    async def start(self) -> None:
        await self._resync()
        self._task = asyncio.create_task(self._watch_forever(), name="serverlessmodel-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.client.close()

    def list_models(self) -> list[ModelView]:
        return [self._views[k] for k in sorted(self._views)]

    def get_model(self, name: str) -> ModelView | None:
        return self._views.get(name)

    async def scale(self, name: str, replicas: int) -> None:
        owner = self._owners.get(name)
        if owner is None:
            raise KeyError(f"no ServerlessModel named {name!r}")
        namespace, obj_name = owner
        view = self._views.get(name)
        if view is not None and errors_free(view):
            # Stay inside the model's bounds; the API server would reject spec.replicas > 64.
            scaling = view.model.spec.scaling
            replicas = max(0, min(replicas, scaling.max_replicas))
        await self.client.merge_patch(
            path_of(MODELS_API, PLURAL, namespace, obj_name, "scale"),
            {"spec": {"replicas": replicas}},
        )
        log.info("model.scale", model=name, namespace=namespace, replicas=replicas)

    async def report_slo_attainment(self, name: str, attainment: SloAttainmentStatus) -> None:
        owner = self._owners.get(name)
        if owner is None:
            return
        namespace, obj_name = owner
        body = {"status": {"sloAttainment": attainment.model_dump(by_alias=True, mode="json")}}
        await self.client.merge_patch(
            path_of(MODELS_API, PLURAL, namespace, obj_name, "status"), body
        )

    async def wait_for_change(self, name: str, timeout: float) -> None:
        event = self._changed[name]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    # -- cache -------------------------------------------------------------------------

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name, namespace = meta.get("name"), meta.get("namespace", "default")
        if not name or (self.only_namespaces and namespace not in self.only_namespaces):
            return
        key = qualified_id(namespace, name)
        if kind == "DELETED":
            self._views.pop(key, None)
            self._owners.pop(key, None)
        else:
            view = model_view(obj)
            if view is None:
                return
            self._views[key] = view
            self._owners[key] = (namespace, name)
        # Wake every waiter, then start a fresh event for the next change.
        self._changed.pop(key, asyncio.Event()).set()

    async def _resync(self) -> None:
        items = await self.client.list(self._path)
        seen = set()
        for obj in items:
            self._apply("ADDED", obj)
            meta = obj.get("metadata") or {}
            key = qualified_id(meta.get("namespace", "default"), meta.get("name") or "")
            if key in self._owners:
                seen.add(key)
        for gone in set(self._views) - seen:
            namespace, name = self._owners[gone]
            self._apply("DELETED", {"metadata": {"name": name, "namespace": namespace}})
        self._synced.set()

    async def _watch_forever(self) -> None:
        while True:
            try:
                async for event in self.client.watch(self._path):
                    kind, obj = event.get("type"), event.get("object") or {}
                    if kind in ("ADDED", "MODIFIED", "DELETED"):
                        self._apply(str(kind), obj)
                    elif kind == "ERROR":
                        log.warning("watch.error", status=obj)
                        break
                await self._resync()  # the server ended the stream: catch up on what we missed
            except asyncio.CancelledError:
                raise
            except (KubeError, OSError, Exception) as exc:
                log.warning("watch.failed", error=str(exc) or type(exc).__name__)
                await asyncio.sleep(RECONNECT_DELAY_S)
                with contextlib.suppress(Exception):
                    await self._resync()


def errors_free(view: ModelView) -> bool:
    return view.error is None and isinstance(view.model.spec, ServerlessModelSpec)
