"""kopf wiring: thin handlers that call the reconciler, and the operator's kopf settings.

Triggers (all end in the same idempotent :meth:`Reconciler.reconcile`):

* the ServerlessModel is created, its spec changes (the gateway's scale writes
  ``spec.replicas``), or the operator resumes it after a restart;
* one of its worker pods changes (scheduled, ready, failed, deleted);
* a periodic resync, so drift (a deleted Service, a node gone) is repaired anyway;
* while a model is Consolidating (or a pipeline of it drains), a faster timer: what a
  consolidation waits for (the node's whole-model fetch, the drain) is read over HTTP.

Deletion runs behind the ``hydraserve.io/cleanup`` finalizer. With more than one replica,
kopf peering elects the leader: every replica takes a random priority, the highest works
and the others stay paused until its keep-alives stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import kopf

from hydraserve.api.models import GROUP, PLURAL, VERSION, InstancePhase, ModelPhase
from hydraserve.kube.client import KubeClient, KubeConfig
from hydraserve.logs import get_logger
from hydraserve.operator.inventory import WORKER_LABELS, IndexedInventory, ListedInventory
from hydraserve.operator.naming import FINALIZER, MANAGED_BY, MANAGED_BY_VALUE, MODEL_LABEL
from hydraserve.operator.planning import Planner
from hydraserve.operator.reconciler import Reconciler, load_manifest
from hydraserve.operator.settings import OperatorSettings
from hydraserve.store import Manifest

log = get_logger("operator")


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A kopf body as the plain dict the reconciler's pure functions read."""
    return {key: body[key] for key in ("metadata", "spec", "status") if key in body}


def post_event(obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
    """A Kubernetes Event on the model (queued by kopf; dropped when posting is off)."""
    body = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": obj.get("metadata") or {},
    }
    # Outside an operator's context (e.g. unit tests) there is nothing to post to.
    with contextlib.suppress(LookupError):
        kopf.event(body, type=type_, reason=reason, message=message[:1000])


class OperatorApp:
    """One operator process: its kopf registry, settings and reconciler."""

    def __init__(
        self,
        settings: OperatorSettings,
        kube_config: KubeConfig,
        *,
        planner: Planner | None = None,
        manifest_loader: Callable[[str, str], Manifest] = load_manifest,
    ) -> None:
        self.settings = settings
        self.kube_config = kube_config
        self.planner = planner
        self.manifest_loader = manifest_loader
        self.priority = (
            settings.priority if settings.priority is not None else random.randint(1, 2**30)
        )
        self._reconciler: Reconciler | None = None
        self.registry = self._build_registry()

    @property
    def reconciler(self) -> Reconciler:
        if self._reconciler is None:
            raise RuntimeError("the operator has not started")
        return self._reconciler

    def _build_registry(self) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        models = (GROUP, VERSION, PLURAL)

        @kopf.on.startup(registry=registry)
        async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
            self.configure(settings)
            self._reconciler = Reconciler(
                KubeClient(self.kube_config),
                self.settings,
                planner=self.planner,
                manifest_loader=self.manifest_loader,
                events=post_event,
            )
            log.info(
                "operator.started",
                priority=self.priority,
                namespaces=self.settings.namespaces or "all",
            )

        @kopf.on.cleanup(registry=registry)
        async def cleanup(**_: Any) -> None:
            if self._reconciler is not None:
                await self._reconciler.client.close()
                await self._reconciler.close()

        @kopf.on.login(registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            cfg = self.kube_config
            return kopf.ConnectionInfo(
                server=cfg.server,
                ca_path=str(cfg.ca_file) if cfg.ca_file else None,
                insecure=cfg.insecure,
                token=cfg.bearer_token(),
                scheme="Bearer" if cfg.bearer_token() else None,
                certificate_path=str(cfg.cert_file) if cfg.cert_file else None,
                private_key_path=str(cfg.key_file) if cfg.key_file else None,
                default_namespace=cfg.namespace,
            )

        # Watch-fed indexes of what every pass reads cluster-wide (decision 0202). kopf fills
        # them before any resource handler runs and passes them to each as keyword args.
        @kopf.index("v1", "nodes", id="hydraserve_nodes", registry=registry)
        def hydraserve_nodes(name: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
            return {name: _plain(body)}

        @kopf.index("v1", "pods", id="hydraserve_workers", labels=WORKER_LABELS, registry=registry)
        def hydraserve_workers(
            namespace: str, name: str, body: kopf.Body, **_: Any
        ) -> dict[Any, Any]:
            return {(namespace, name): _plain(body)}

        watched = self.settings.namespaces
        prefetchers_watched = not watched or self.settings.prefetcher_namespace in watched
        if prefetchers_watched:

            @kopf.index(
                "v1",
                "pods",
                id="hydraserve_prefetchers",
                labels=self.settings.prefetcher_labels,
                registry=registry,
            )
            def hydraserve_prefetchers(
                namespace: str, name: str, body: kopf.Body, **_: Any
            ) -> dict[Any, Any]:
                if namespace != self.settings.prefetcher_namespace:
                    return {}
                return {name: _plain(body)}

        def bind(indexes: Mapping[str, Any]) -> None:
            reconciler = self.reconciler
            if isinstance(reconciler.inventory, IndexedInventory):
                return
            listed = ListedInventory(reconciler.client, self.settings)
            reconciler.inventory = IndexedInventory(
                indexes["hydraserve_nodes"],
                indexes["hydraserve_workers"],
                indexes.get("hydraserve_prefetchers"),
                listed,
            )

        async def converge(namespace: str, name: str, trigger: str) -> None:
            outcome = await self.reconciler.reconcile(namespace, name)
            if outcome.retry_after is not None:
                # kopf retries the handler later; no sleeping in the handler.
                raise kopf.TemporaryError(outcome.message, delay=outcome.retry_after)

        @kopf.on.resume(*models, registry=registry)
        @kopf.on.create(*models, registry=registry)
        @kopf.on.update(*models, field="spec", registry=registry)
        async def model_changed(namespace: str, name: str, reason: str, **kw: Any) -> None:
            bind(kw)
            await converge(namespace, name, str(reason))

        @kopf.timer(*models, interval=self.settings.resync_seconds, registry=registry)
        async def resync(namespace: str, name: str, **kw: Any) -> None:
            bind(kw)
            await self.reconciler.reconcile(namespace, name)

        def starting(status: kopf.Status, **_: Any) -> bool:
            # Readiness also needs every stage's bytes verified by the node prefetchers,
            # which no watch event announces: look again until the instance is Ready.
            instances = status.get("instances") or []
            return any(i.get("phase") == InstancePhase.STARTING.value for i in instances)

        @kopf.timer(
            *models,
            interval=self.settings.starting_poll_seconds,
            when=starting,
            registry=registry,
        )
        async def readiness(namespace: str, name: str, **kw: Any) -> None:
            bind(kw)
            await self.reconciler.reconcile(namespace, name)

        def consolidating(status: kopf.Status, **_: Any) -> bool:
            # A pipeline may still drain when nothing serves (scaled to zero meanwhile).
            instances = status.get("instances") or []
            return status.get("phase") == ModelPhase.CONSOLIDATING.value or any(
                i.get("phase") == InstancePhase.DRAINING.value for i in instances
            )

        # kopf starts this timer when a model consolidates and stops it after.
        @kopf.timer(
            *models,
            interval=self.settings.consolidation_poll_seconds,
            when=consolidating,
            registry=registry,
        )
        async def consolidation(namespace: str, name: str, **kw: Any) -> None:
            bind(kw)
            await self.reconciler.reconcile(namespace, name)

        @kopf.on.event("v1", "pods", labels={MANAGED_BY: MANAGED_BY_VALUE}, registry=registry)
        async def worker_changed(body: kopf.Body, namespace: str, **kw: Any) -> None:
            bind(kw)
            model = (body.get("metadata") or {}).get("labels", {}).get(MODEL_LABEL)
            if not model:
                return
            try:
                await self.reconciler.reconcile(namespace, model)
            except Exception as exc:  # the model's own handlers and the resync retry
                log.warning(
                    "reconcile.failed",
                    model=model,
                    namespace=namespace,
                    trigger="pod",
                    error=str(exc),
                )

        @kopf.on.delete(*models, registry=registry)
        async def model_deleted(namespace: str, name: str, **_: Any) -> None:
            await self.reconciler.cleanup(namespace, name)

        return registry

    def configure(self, settings: kopf.OperatorSettings) -> None:
        """kopf's own settings: where it keeps state, what it posts, how it elects."""
        settings.persistence.finalizer = FINALIZER
        # Annotations, not status: the CRD's structural schema would prune status.kopf.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        settings.posting.enabled = self.settings.post_events
        settings.posting.level = logging.WARNING  # explicit events only, not handler chatter
        settings.peering.name = self.settings.peering_name
        settings.peering.priority = self.priority
        settings.peering.standalone = self.settings.standalone
        settings.peering.mandatory = not self.settings.standalone
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330

    async def run(
        self,
        stop_flag: asyncio.Event | None = None,
        ready_flag: asyncio.Event | None = None,
    ) -> None:
        await kopf.operator(
            registry=self.registry,
            clusterwide=not self.settings.namespaces,
            namespaces=self.settings.namespaces,
            standalone=self.settings.standalone,
            priority=self.priority,
            # Naming a peering makes it mandatory in kopf, which pauses a standalone operator.
            peering_name=None if self.settings.standalone else self.settings.peering_name,
            liveness_endpoint=self.settings.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
        )
