"""Model ids across namespaces, and what one caller may see (decision 0502).

A model's canonical id is ``<namespace>/<name>``: it is what ``/v1/models`` lists, what
the gateway keys its queues, autoscaler, SLO windows and metrics by, and what its logs
name. A request may name a model by that id or by its bare ``name`` when exactly one
model the caller sees has that name (so one-namespace platforms such as ``hydraserve up``
keep working with bare names); several → 400 listing the ids; none → 404, the same 404
whether the model is missing or merely outside the caller's scope.

:class:`Catalog` puts the gateway's keys (canonical ids) in front of a backend that keys
its models either by canonical id or, as the backends did before namespaces mattered, by
bare name: every lookup checks that the view it found really is the model asked for.
"""

from __future__ import annotations

from hydraserve.api.models import SloAttainmentStatus
from hydraserve.backends.base import ClusterBackend, ModelView, qualified_id
from hydraserve.gateway import errors
from hydraserve.gateway.auth import Principal

SEPARATOR = "/"  # neither Kubernetes names nor namespaces can contain it


def model_id(view: ModelView) -> str:
    """The canonical id of a model: ``<namespace>/<name>``."""
    meta = view.model.metadata
    return qualified_id(meta.namespace, meta.name)


def is_qualified(model: str) -> bool:
    return SEPARATOR in model


def visible(principal: Principal, view: ModelView) -> bool:
    meta = view.model.metadata
    return principal.sees(meta.namespace, meta.name)


class Catalog(ClusterBackend):
    """The backend as the gateway uses it: models by canonical id."""

    def __init__(self, inner: ClusterBackend) -> None:
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    def list_models(self) -> list[ModelView]:
        return self.inner.list_models()

    def _key(self, model: str) -> str:
        """The backend's key for the canonical id ``model``: the id itself when the
        backend knows models by id, else the bare name (one namespace per name there)."""
        if self._match(model, model) is not None:
            return model
        return model.rpartition(SEPARATOR)[2]

    def _match(self, model: str, key: str) -> ModelView | None:
        view = self.inner.get_model(key)
        return view if view is not None and model_id(view) == model else None

    def get_model(self, name: str) -> ModelView | None:
        """The model with canonical id ``name``; None for a bare name or another
        namespace's model of the same name."""
        if not is_qualified(name):
            return None
        return self._match(name, name) or self._match(name, name.rpartition(SEPARATOR)[2])

    async def scale(self, name: str, replicas: int) -> None:
        await self.inner.scale(self._key(name), replicas)

    async def wait_for_change(self, name: str, timeout: float) -> None:
        await self.inner.wait_for_change(self._key(name), timeout)

    async def report_slo_attainment(self, name: str, attainment: SloAttainmentStatus) -> None:
        await self.inner.report_slo_attainment(self._key(name), attainment)

    # --- what one caller may use --------------------------------------------------------

    def resolve(self, requested: str, principal: Principal) -> ModelView:
        """The model ``requested`` names for this caller, or 404 (missing or not in the
        caller's scope, alike) or 400 (a bare name several visible models share)."""
        if is_qualified(requested):
            view = self.get_model(requested)
            if view is None or not visible(principal, view):
                raise errors.model_not_found(requested)
            return view
        # A bare name: every visible model of that name (a scan of the cached list).
        matches = [
            v
            for v in self.inner.list_models()
            if v.model.metadata.name == requested and visible(principal, v)
        ]
        if not matches:
            raise errors.model_not_found(requested)
        if len(matches) > 1:
            raise errors.ambiguous_model(requested, sorted(model_id(v) for v in matches))
        return matches[0]

    def visible_models(self, principal: Principal) -> list[ModelView]:
        """The models this caller sees, ordered by id."""
        views = [v for v in self.inner.list_models() if visible(principal, v)]
        return sorted(views, key=model_id)
