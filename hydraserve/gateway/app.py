"""The gateway application: OpenAI-compatible routes wired to the cluster backend.

``create_app(backend, settings)`` builds everything; the backend is the only way the
gateway reaches the control plane (``hydraserve.backends.base.ClusterBackend``).

Model ids (decision 0502): a model is ``<namespace>/<name>`` in ``/v1/models`` and in
the gateway's metrics and logs. A request's ``model`` (and ``/v1/models/{id}``) may be
that id, or the bare name when exactly one model the caller's key sees has it; a bare
name several visible models share is a 400 listing their ids, and a model outside the
key's scope is the same 404 as a missing one. The engine is always sent the name it
serves (``metadata.name``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from hydraserve import __version__
from hydraserve.api.models import SloAttainmentStatus
from hydraserve.backends.base import ClusterBackend, InstancePhase, ModelView
from hydraserve.gateway import errors
from hydraserve.gateway.auth import ANONYMOUS, Authenticator, Principal
from hydraserve.gateway.autoscaler import Autoscaler
from hydraserve.gateway.catalog import Catalog, model_id
from hydraserve.gateway.dispatcher import Dispatcher, Ticket
from hydraserve.gateway.errors import GatewayError, install_error_handlers
from hydraserve.gateway.metrics import CONTENT_TYPE, UNKNOWN_MODEL, GatewayMetrics
from hydraserve.gateway.middleware import FrontDoorMiddleware
from hydraserve.gateway.observer import ClusterObserver
from hydraserve.gateway.proxy import ProxiedRequest, ProxyContext, ProxyResponse, Upstream
from hydraserve.gateway.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    ModelStatus,
)
from hydraserve.gateway.settings import GatewaySettings
from hydraserve.gateway.slo import SloWindow
from hydraserve.logs import get_logger

log = get_logger("gateway")

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = frozenset({COMPLETIONS, CHAT_COMPLETIONS, "/v1/models"})


class ForwardResponse(Response):
    """Adapts :class:`ProxyResponse` to Starlette's response type."""

    def __init__(self, proxy: ProxyResponse) -> None:
        self.proxy = proxy
        self.background = None
        self.status_code = 200

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.proxy(scope, receive, send)


class CompletionEndpoint:
    """``POST /v1/completions`` and ``/v1/chat/completions`` as a lean ASGI endpoint.

    FastAPI's per-request machinery (dependency solving, body parsing in two steps,
    response wrapping) costs about as much CPU as forwarding the request does, and these
    two routes carry all the traffic. The same request model validates the body (in one
    step, from JSON), errors go through the same OpenAI-shape answers, and FastAPI
    routes declared for the same paths still describe them in the OpenAPI document.
    """

    def __init__(
        self,
        gateway: Gateway,
        endpoint: str,
        request_model: type[CompletionRequest] | type[ChatCompletionRequest],
    ) -> None:
        self._gateway = gateway
        self._endpoint = endpoint
        self._model = request_model

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        arrived_at = time.perf_counter()
        request = Request(scope, receive)
        try:
            principal = self._gateway.principal(request)
            body = await request.body()
            try:
                parsed = self._model.model_validate_json(body)
            except ValidationError as exc:
                raise errors.validation_error(exc.errors(include_input=False)) from None
            response = self._gateway.forward(
                request,
                endpoint=self._endpoint,
                parsed=parsed,
                body=body,
                principal=principal,
                arrived_at=arrived_at,
            )
        except GatewayError as error:
            self._gateway.on_error(request, error)
            response = errors.error_response(error)
        await response(scope, receive, send)


class Gateway:
    """The gateway's parts, reachable from tests as ``app.state.gateway``."""

    def __init__(
        self,
        backend: ClusterBackend,
        settings: GatewaySettings,
        authenticator: Authenticator | None,
    ) -> None:
        # Every part keys models by canonical id; the catalog translates for the backend.
        catalog = self.backend = Catalog(backend)
        self.settings = settings
        self.authenticator = authenticator
        self.metrics = GatewayMetrics()
        self.observer = ClusterObserver(self.metrics)
        self.autoscaler = Autoscaler(
            catalog,
            self._in_flight,
            interval=settings.autoscale_interval_seconds,
            on_decision=lambda model, n: self.metrics.desired_replicas.labels(model).set(n),
        )
        self.dispatcher = Dispatcher(
            catalog,
            settings,
            self.metrics,
            on_in_flight=self.autoscaler.record,
            on_view=self.observer.observe_model,
        )
        self.upstream = Upstream(settings)
        self.slo = SloWindow(settings.slo_window_seconds)
        self.proxy_context = ProxyContext(
            self.dispatcher, self.upstream, self.metrics, settings, slo=self.slo
        )
        self.started_at = time.time()

    def _in_flight(self, model: str) -> int:
        return self.dispatcher.in_flight(model)

    # --- request handling -----------------------------------------------------------

    def principal(self, request: Request) -> Principal:
        if self.authenticator is None:
            return ANONYMOUS
        return self.authenticator.authenticate(request.headers.get("authorization"))

    def resolve(self, request: Request, model: str, principal: Principal) -> ModelView:
        """The model a request names, for this caller (see the module docstring), or
        400 (ambiguous bare name), 404 (missing or not in the key's scope) or 503."""
        view = self.backend.resolve(model, principal)
        canonical = model_id(view)
        request.state.model = canonical
        if view.error is not None:
            self.metrics.rejections.labels(canonical, "model_unavailable").inc()
            raise errors.model_unavailable(canonical, view.error)
        return view

    def forward(
        self,
        request: Request,
        *,
        endpoint: str,
        parsed: CompletionRequest | ChatCompletionRequest,
        body: bytes,
        principal: Principal,
        arrived_at: float,
    ) -> Response:
        view = self.resolve(request, parsed.model, principal)
        if parsed.model != view.name:
            # A qualified id: the engine serves the bare name (--served-model-name).
            body = _with_model(body, view.name)
        cold = not view.ready_instances
        ticket: Ticket = self.dispatcher.admit(view)  # raises 429 when the queue is full
        slo = view.model.spec.slo
        proxied = ProxiedRequest(
            model=model_id(view),
            endpoint=endpoint,
            body=body,
            stream=parsed.stream,
            request_id=request.state.request_id,
            arrived_at=arrived_at,
            key_name=principal.name,
            ttft_slo_s=slo.ttft_seconds,
            tpot_slo_s=slo.tpot_milliseconds / 1000,
            cold=cold,
        )
        return ForwardResponse(ProxyResponse(self.proxy_context, proxied, ticket))

    def model_card(self, view: ModelView) -> ModelCard:
        starting = sum(1 for i in view.instances if i.phase == InstancePhase.STARTING)
        canonical = model_id(view)
        return ModelCard(
            id=canonical,
            created=_created(view, self.started_at),
            owned_by=view.model.metadata.namespace,
            hydraserve=ModelStatus(
                desired_replicas=view.desired_replicas,
                ready_instances=len(view.ready_instances),
                starting_instances=starting,
                phase=view.effective_phase.value,
                error=view.error,
                slo_attainment=self.slo_attainment(canonical),
            ),
        )

    def slo_attainment(self, model: str) -> SloAttainmentStatus | None:
        """The model's attainment over the window, also exported as gauges."""
        attainment = self.slo.attainment(model, time.time())
        if attainment is not None:
            for key in ("ttft_cold", "ttft_warm", "tpot_cold", "tpot_warm"):
                slo, start = key.split("_")
                ratio = getattr(attainment, key).ratio
                if ratio is not None:
                    self.metrics.slo_attainment.labels(model, slo, start).set(ratio)
        return attainment

    def on_error(self, request: Request, error: GatewayError) -> None:
        """Counts answers the gateway gives without reaching an engine."""
        model = getattr(request.state, "model", UNKNOWN_MODEL)
        path = request.url.path
        endpoint = path if path in ENDPOINTS else "other"
        self.metrics.requests.labels(model, endpoint, str(error.status)).inc()
        if error.status in (401, 403, 429) and error.code != "queue_full":
            self.metrics.rejections.labels(model, error.code or str(error.status)).inc()
        if self.settings.access_log:
            log.info(
                "request.refused",
                model=model,
                endpoint=endpoint,
                status=error.status,
                code=error.code,
                request_id=getattr(request.state, "request_id", None),
            )

    # --- background work --------------------------------------------------------------

    @asynccontextmanager
    async def running(self, manage_backend: bool) -> AsyncIterator[None]:
        if manage_backend:
            await self.backend.start()
        await self.upstream.start()
        loops: list[Coroutine[Any, Any, None]] = [
            self.autoscaler.run(),
            self.observer.run(self.backend.list_models, self.settings.observe_interval_seconds),
        ]
        if self.authenticator is not None:
            loops.append(self.authenticator.run_reload(self.settings.api_keys_reload_seconds))
        loops.append(self.report_slo_attainment())
        tasks = [asyncio.create_task(loop) for loop in loops]
        log.info("gateway.started", auth=self.authenticator is not None,
                 models=[model_id(v) for v in self.backend.list_models()])  # fmt: skip
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.dispatcher.close_all()
            await self.upstream.close()
            if manage_backend:
                await self.backend.close()

    async def report_slo_attainment(self) -> None:
        """Every ``slo_report_seconds``: each model's attainment into its status."""
        while True:
            await asyncio.sleep(self.settings.slo_report_seconds)
            for model in self.slo.models():
                attainment = self.slo_attainment(model)
                if attainment is None:
                    continue
                try:
                    await self.backend.report_slo_attainment(model, attainment)
                except Exception as exc:  # the next round writes it again
                    log.warning("slo.report_failed", model=model, error=str(exc))


def _with_model(body: bytes, model: str) -> bytes:
    """The request body with ``model`` replaced (the body was validated as an object)."""
    data = json.loads(body)
    data["model"] = model
    return json.dumps(data).encode()


def _created(view: ModelView, default: float) -> int:
    extra = view.model.metadata.model_extra or {}
    stamp = extra.get("creationTimestamp") or extra.get("creation_timestamp")
    if isinstance(stamp, str):
        try:
            return int(datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp())
        except ValueError:
            pass
    return int(default)


def build_authenticator(settings: GatewaySettings) -> Authenticator | None:
    """The configured authenticator; refuses to start with auth on and no keys."""
    if not settings.auth_enabled:
        return None
    if settings.api_keys_file is None:
        raise ValueError(
            "API keys are required but none are configured: set "
            "HYDRASERVE_GATEWAY_API_KEYS_FILE to a keys file (or a mounted Secret), or "
            "HYDRASERVE_GATEWAY_AUTH_ENABLED=false for a private, single-user deployment."
        )
    return Authenticator.from_file(settings.api_keys_file)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed request; `param` names the field."},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key."},
    404: {
        "model": ErrorResponse,
        "description": "Unknown model, or one outside the key's scope (alike).",
    },
    413: {"model": ErrorResponse, "description": "Request body too large."},
    429: {"model": ErrorResponse, "description": "Rate limit or full queue; see Retry-After."},
    503: {"model": ErrorResponse, "description": "No instance in time; see Retry-After."},
}

COMPLETION_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The engine's answer: JSON, or server-sent events when `stream`.",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            # One schema per event: `data` is a JSON chunk, an error object, or [DONE].
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {"data": {"type": "string"}, "event": {"type": "string"}},
                }
            },
        },
    }
}


def create_app(
    backend: ClusterBackend,
    settings: GatewaySettings | None = None,
    *,
    manage_backend: bool = True,
    authenticator: Authenticator | None = None,
) -> FastAPI:
    """The gateway as an ASGI app.

    ``manage_backend``: the app's lifespan starts and closes the backend (the gateway
    process owns it); pass False when something else (``hydraserve up``) runs it.
    ``authenticator``: overrides the one built from ``settings`` (tests).
    """
    settings = settings or GatewaySettings()
    if authenticator is None:
        authenticator = build_authenticator(settings)
    gateway = Gateway(backend, settings, authenticator)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with gateway.running(manage_backend):
            yield

    app = FastAPI(
        title="HydraServe gateway",
        version=__version__,
        description="OpenAI-compatible front door with scale-from-zero.",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.gateway = gateway
    install_error_handlers(app, gateway.on_error)
    app.add_middleware(FrontDoorMiddleware, max_bytes=settings.max_request_bytes)

    async def principal(request: Request) -> Principal:
        # async: FastAPI would run a plain function in a thread pool, per request.
        return gateway.principal(request)

    # Served by CompletionEndpoint (matched first); the FastAPI declarations after them
    # are never reached and only document the two routes in the OpenAPI document.
    for path, request_model in (
        (COMPLETIONS, CompletionRequest),
        (CHAT_COMPLETIONS, ChatCompletionRequest),
    ):
        app.router.routes.append(
            Route(path, CompletionEndpoint(gateway, path, request_model), methods=["POST"])
        )

    @app.post(
        COMPLETIONS,
        responses={**COMPLETION_OK, **ERROR_RESPONSES},
        response_class=Response,
        summary="Create a completion",
    )
    async def completions(
        body: CompletionRequest, who: Principal = Depends(principal)
    ) -> Response:  # pragma: no cover - documentation only
        raise AssertionError("served by CompletionEndpoint")

    @app.post(
        CHAT_COMPLETIONS,
        responses={**COMPLETION_OK, **ERROR_RESPONSES},
        response_class=Response,
        summary="Create a chat completion",
    )
    async def chat_completions(
        body: ChatCompletionRequest, who: Principal = Depends(principal)
    ) -> Response:  # pragma: no cover - documentation only
        raise AssertionError("served by CompletionEndpoint")

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses={401: ERROR_RESPONSES[401], 429: ERROR_RESPONSES[429]},
        summary="List models",
    )
    async def list_models(who: Principal = Depends(principal)) -> ModelList:
        views = gateway.backend.visible_models(who)
        return ModelList(data=[gateway.model_card(v) for v in views])

    # ``:path``: a canonical id has a slash (namespace/name).
    @app.get(
        "/v1/models/{model:path}",
        response_model=ModelCard,
        responses={k: ERROR_RESPONSES[k] for k in (400, 401, 404, 429)},
        summary="Retrieve a model (by namespace/name, or by name when unambiguous)",
    )
    async def get_model(
        model: str, request: Request, who: Principal = Depends(principal)
    ) -> ModelCard:
        return gateway.model_card(gateway.backend.resolve(model, who))

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics(request: Request) -> Response:
        # Series are labelled with every tenant's model ids: only an operator's key (or,
        # by default, whoever reaches this port, which must not be a tenant) reads them.
        gated = settings.metrics_require_key and authenticator is not None
        if gated and not gateway.principal(request).sees_everything:
            raise errors.GatewayError(
                403,
                "GET /metrics needs a key whose scope is every namespace and model.",
                type=errors.PERMISSION,
                code="metrics_not_allowed",
            )
        return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _openapi_document(app, auth=authenticator is not None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _openapi_document(app: FastAPI, *, auth: bool) -> dict[str, Any]:
    """FastAPI's document, corrected to what the gateway answers: validation errors are
    400 in the OpenAI shape (not FastAPI's 422), and /v1 needs a bearer key."""
    document = get_openapi(
        title=app.title, version=app.version, description=app.description, routes=app.routes
    )
    schemas = document.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    if auth:
        document.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"}
        }
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if "422" in responses:
                del responses["422"]
                responses.setdefault(
                    "400",
                    {
                        "description": ERROR_RESPONSES[400]["description"],
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ErrorResponse"}
                            }
                        },
                    },
                )
            if auth and path.startswith("/v1/"):
                operation["security"] = [{"bearer": []}]
    return document
