"""Forwarding one accepted request to an engine, streamed or not.

:class:`ProxyResponse` is an ASGI response that decides its status late: it waits for an
instance (sending SSE keep-alives to a streaming client that waits long), forwards the
request, and relays the answer. It guarantees the accepted request exactly one response:
the engine's, or a gateway error in the OpenAI shape; once a stream has started, errors
become a well-formed error event followed by ``[DONE]``. A client that disconnects
cancels the work at once, which closes the engine connection (vLLM then aborts the
generation) and frees the request's lease or queue slot.

Requests on a pipelined instance (which consolidation will replace) are relayed through a
:class:`~hydraserve.gateway.migration.StreamStitcher` instead of byte for byte: when the
instance drains, the request moves to the new instance mid-stream (recompute or KV
transfer, by the cost model) and the client sees one uninterrupted stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from starlette.types import Receive, Scope, Send

from hydraserve.backends.base import InstanceView, ModelView
from hydraserve.gateway import errors
from hydraserve.gateway.dispatcher import Dispatcher, Ticket
from hydraserve.gateway.errors import GatewayError
from hydraserve.gateway.metrics import GatewayMetrics
from hydraserve.gateway.migration import (
    MigrationChoice,
    MigrationCosts,
    MigrationMethod,
    PrefillEstimator,
    StreamStitcher,
    choose_method,
    pinned_reason,
)
from hydraserve.gateway.settings import GatewaySettings
from hydraserve.gateway.slo import SloWindow
from hydraserve.gateway.sse import (
    DONE_MARK,
    KEEPALIVE,
    EventFramer,
    count_token_events,
    data_payloads,
    error_event,
)
from hydraserve.logs import get_logger

log = get_logger("gateway")

CLIENT_CLOSED = 499  # nginx's convention, for metrics and logs only: nothing is sent

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx and friends: do not buffer the stream
]


class Upstream:
    """The HTTP client to engines: one pooled aiohttp session for the gateway's life."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=self._settings.upstream_max_connections,
            limit_per_host=0,
            # Below uvicorn's (vLLM's server) 5 s keep-alive, so a pooled connection is
            # not reused just as the engine closes it.
            keepalive_timeout=4.0,
        )
        timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=self._settings.upstream_connect_timeout_seconds,
            sock_read=self._settings.upstream_read_timeout_seconds,
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, body: bytes, request_id: str) -> aiohttp.ClientResponse:
        assert self._session is not None, "Upstream.start() was not called"
        headers = {
            "Content-Type": "application/json",
            "Accept-Encoding": "identity",
            "X-Request-Id": request_id,
        }
        return await self._session.post(url, data=body, headers=headers)


@dataclass
class ProxyContext:
    """What every proxied request shares."""

    dispatcher: Dispatcher
    upstream: Upstream
    metrics: GatewayMetrics
    settings: GatewaySettings
    prefill: dict[str, PrefillEstimator] = field(default_factory=dict)
    slo: SloWindow | None = None

    def prefill_estimator(self, model: str) -> PrefillEstimator:
        found = self.prefill.get(model)
        if found is None:
            found = self.prefill[model] = PrefillEstimator(
                self.settings.migration_prefill_tokens_per_s
            )
        return found


@dataclass
class ProxiedRequest:
    model: str
    endpoint: str  # the OpenAI path, e.g. /v1/completions
    body: bytes
    stream: bool
    request_id: str
    arrived_at: float  # time.perf_counter()
    key_name: str | None = None
    ttft_slo_s: float | None = None  # the model's spec.slo, to count attainment
    tpot_slo_s: float | None = None
    cold: bool = False  # no instance was ready when the request was admitted


def _is_retryable_before_response(exc: BaseException) -> bool:
    """Errors that mean the engine never got (or never started on) the request: a refused
    or reset connection, or a connect timeout. Read timeouts are not among them."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return True
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError):
        return False
    return isinstance(exc, aiohttp.ClientOSError | aiohttp.ServerDisconnectedError)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _url(instance: InstanceView, path: str) -> str:
    return (instance.endpoint or "").rstrip("/") + path


def normalize_error_body(body: bytes, status: int) -> bytes:
    """An engine's error body in the OpenAI shape (vLLM's older flat shape included)."""
    try:
        data: Any = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        inner = data.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return body
        if "message" in data:
            return json.dumps(
                errors.error_body(
                    str(data["message"]),
                    str(data.get("type") or errors.UPSTREAM),
                    None if data.get("code") is None else str(data.get("code")),
                    None if data.get("param") is None else str(data.get("param")),
                )
            ).encode()
    text = body.decode("utf-8", "replace").strip()[:2000] or f"HTTP {status} from the engine"
    return json.dumps(errors.error_body(text, errors.UPSTREAM, str(status))).encode()


class ProxyResponse:
    """An ASGI response that forwards one admitted request (see the module docstring)."""

    def __init__(self, context: ProxyContext, request: ProxiedRequest, ticket: Ticket) -> None:
        self._ctx = context
        self._req = request
        self._ticket = ticket
        self._committed = False  # response headers sent
        self._status = 0
        self._instance: InstanceView | None = None
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self._token_events = 0
        self._queue_wait = 0.0
        self._response_complete = False  # the last body message was sent
        self._parsed: dict[str, Any] = {}
        self._migrations = 0
        self._legs = 0
        self._max_gap: float | None = None  # longest gap between relayed token events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A plain task watching for the disconnect (cheaper per request than a task group):
        # it cancels this task, unless the response is already complete.
        this_task = asyncio.current_task()
        assert this_task is not None
        disconnected = False

        async def watch_disconnect() -> None:
            nonlocal disconnected
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not self._response_complete:
                        disconnected = True
                        this_task.cancel()
                    return

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            await self._serve(send)
        except asyncio.CancelledError:
            if not disconnected:
                raise
            this_task.uncancel()  # the client left; nothing else asked to cancel us
        finally:
            watcher.cancel()
            self._ctx.dispatcher.close(self._ticket)
            if disconnected and not self._response_complete:
                self._status = CLIENT_CLOSED
                self._ctx.metrics.rejections.labels(self._req.model, "client_disconnected").inc()
            self._record()

    # --- the request's life -------------------------------------------------------------

    async def _serve(self, send: Send) -> None:
        try:
            instance = await self._acquire(send)
            if self._may_move(instance):
                await self._serve_movable(instance, send)
                return
            while True:
                try:
                    response = await self._ctx.upstream.post(
                        _url(instance, self._req.endpoint), self._req.body, self._req.request_id
                    )
                    break
                except Exception as exc:
                    if not _is_retryable_before_response(exc):
                        raise
                    self._ctx.dispatcher.retry_elsewhere(self._ticket)  # raises when out of tries
                    instance = await self._acquire(send)
            try:
                await self._relay(response, send)
            finally:
                response.close()
        except GatewayError as error:
            await self._send_error(send, error)
        except TimeoutError:  # aiohttp.ServerTimeoutError included
            await self._send_error(
                send,
                errors.upstream_failed(
                    self._req.model,
                    f"no response within {self._ctx.settings.upstream_read_timeout_seconds} s",
                    status=504,
                ),
            )
        except aiohttp.ClientError as exc:
            await self._send_error(send, errors.upstream_failed(self._req.model, repr(exc)))
        except Exception as exc:
            log.error(
                "request.unexpected_error",
                model=self._req.model,
                request_id=self._req.request_id,
                error=repr(exc),
            )
            internal = GatewayError(
                500, "Internal error in the gateway.", type=errors.INTERNAL, code="internal"
            )
            await self._send_error(send, internal)

    # --- requests that can move (on a pipeline that consolidation will replace) ----------

    def _may_move(self, instance: InstanceView) -> bool:
        if not self._ctx.settings.migration_enabled or instance.pp <= 1:
            return False
        try:
            body = json.loads(self._req.body)
        except ValueError:
            return False
        reason = pinned_reason(self._req.endpoint, body) if isinstance(body, dict) else "body"
        if reason is not None:
            # It will finish where it is, even if that instance drains.
            self._ctx.metrics.migrations_skipped.labels(self._req.model, reason).inc()
            return False
        self._parsed = body
        return True

    def _kv_save_key(self, instance: InstanceView, view: ModelView | None) -> str | None:
        """Ask the engine to keep this request's KV if it is aborted (a move), when a move
        by KV transfer could be chosen at all."""
        settings = self._ctx.settings
        if settings.migration_method == "recompute" or not instance.kv_transfer:
            return None
        if view is None or not view.kv_bytes_per_token:
            return None
        self._legs += 1
        return f"{self._req.request_id}-{self._legs}"

    async def _post_leg(
        self, instance: InstanceView, endpoint: str, body: bytes, send: Send
    ) -> tuple[InstanceView, aiohttp.ClientResponse]:
        """POST to the leased instance; one that refuses the connection is skipped (the
        request never started there) and the request goes elsewhere, as in :meth:`_serve`."""
        while True:
            try:
                response = await self._ctx.upstream.post(
                    _url(instance, endpoint), body, self._req.request_id
                )
                return instance, response
            except Exception as exc:
                if not _is_retryable_before_response(exc):
                    raise
                self._ctx.dispatcher.retry_elsewhere(self._ticket)
                instance = await self._acquire(send)

    async def _serve_movable(self, instance: InstanceView, send: Send) -> None:
        dispatcher, metrics, req = self._ctx.dispatcher, self._ctx.metrics, self._req
        stitcher = StreamStitcher(req.endpoint, self._parsed, req.stream)
        view = self._backend_view()
        save_key = self._kv_save_key(instance, view)
        endpoint, body = req.endpoint, stitcher.upstream_body(save_key)
        moved = dispatcher.watch_move(self._ticket)
        posted_at = time.perf_counter()
        try:
            while True:
                instance, response = await self._post_leg(instance, endpoint, body, send)
                self._instance = instance
                try:
                    content_type = response.headers.get("Content-Type", "")
                    if response.status != 200 or not content_type.startswith("text/event-stream"):
                        await self._relay(response, send)
                        return
                    if req.stream and not self._committed:
                        await self._start(send, 200, SSE_HEADERS)
                    outcome = await self._pump(response, stitcher, moved, send, posted_at)
                finally:
                    response.close()  # on a move: the old engine aborts (and may save KV)
                if outcome == "done":
                    break
                if stitcher.finished:
                    # Only the stream's tail (usage, [DONE]) was left: end it here.
                    if req.stream:
                        await self._body(send, stitcher.finish_early().data, more=True)
                    break
                old = instance
                target = dispatcher.move(self._ticket)
                if target is None:
                    detail = "the stream broke off" if outcome == "broken" else "no instance"
                    raise aiohttp.ClientPayloadError(f"{detail} and nowhere to move it")
                choice = self._choose(old, target, stitcher, view, save_key)
                load_key = save_key if choice.method == MigrationMethod.KV else None
                view = self._backend_view()
                save_key = self._kv_save_key(target, view)
                endpoint, body = stitcher.continuation(
                    choice.method, load_key=load_key, save_key=save_key
                )
                self._migrations += 1
                metrics.child(metrics.migrations, req.model, choice.method.value).inc()
                log.info(
                    "request.moved",
                    model=req.model,
                    request_id=req.request_id,
                    from_instance=old.name,
                    to_instance=target.name,
                    method=choice.method.value,
                    why=outcome,
                    context_tokens=choice.tokens,
                    generated=len(stitcher.generated),
                    cost=choice.reason,
                )
                instance = target
                moved = dispatcher.watch_move(self._ticket)
                posted_at = time.perf_counter()
        finally:
            dispatcher.unwatch_move(self._ticket)
            if self._migrations and self._max_gap is not None:
                metrics.child(metrics.migration_stall, req.model).observe(self._max_gap)
        if stitcher.error is not None and not req.stream:
            body_bytes = normalize_error_body(json.dumps(stitcher.error).encode(), 500)
            await self._start(send, 502, [(b"content-type", b"application/json")])
            await self._body(send, body_bytes, more=False)
            return
        if req.stream:
            await self._body(send, b"", more=False)
        else:
            await self._start(send, 200, [(b"content-type", b"application/json")])
            await self._body(send, stitcher.final_body(), more=False)

    def _backend_view(self) -> ModelView | None:
        try:
            return self._ctx.dispatcher.backend.get_model(self._req.model)
        except Exception:
            return None

    def _choose(
        self,
        old: InstanceView,
        new: InstanceView,
        stitcher: StreamStitcher,
        view: ModelView | None,
        save_key: str | None,
    ) -> MigrationChoice:
        settings = self._ctx.settings
        costs = MigrationCosts(
            kv_bytes_per_token=view.kv_bytes_per_token if view is not None else None,
            kv_bytes_per_s=settings.migration_kv_bytes_per_s,
            kv_fixed_seconds=settings.migration_kv_fixed_seconds,
            prefill_tokens_per_s=self._ctx.prefill_estimator(self._req.model).tokens_per_s,
        )
        # KV moves through the node's shared memory: both engines there, both with the
        # connector, and the old one asked to save (the save key) before it started.
        kv_possible = (
            save_key is not None
            and stitcher.prompt_ids is not None
            and old.kv_transfer
            and new.kv_transfer
            and old.node is not None
            and old.node == new.node
        )
        return choose_method(
            stitcher.context_tokens,
            costs,
            kv_possible=kv_possible,
            prefer=settings.migration_method,
        )

    async def _pump(
        self,
        response: aiohttp.ClientResponse,
        stitcher: StreamStitcher,
        moved: asyncio.Event,
        send: Send,
        posted_at: float,
    ) -> str:
        """Relay one upstream leg through the stitcher until it ends ("done"), breaks
        ("broken") or its instance drains ("moved")."""
        framer = EventFramer()
        move_wait = asyncio.ensure_future(moved.wait())
        first_at: float | None = None
        try:
            while True:
                read = asyncio.ensure_future(response.content.readany())
                finished, _ = await asyncio.wait(
                    (read, move_wait), return_when=asyncio.FIRST_COMPLETED
                )
                if read not in finished:
                    read.cancel()
                    read.add_done_callback(_retrieve)  # it may have failed meanwhile
                    return "moved"
                try:
                    chunk = read.result()
                except (aiohttp.ClientError, TimeoutError):
                    return "broken"
                if not chunk:
                    tail = framer.pending.strip()
                    if tail:
                        await self._relay_events(stitcher, tail + b"\n\n", send)
                    return "done" if stitcher.done else "broken"
                events = framer.feed(chunk)
                if not events:
                    continue
                await self._relay_events(stitcher, events, send)
                if first_at is None:
                    # The first output follows the prompt's prefill: learn its throughput.
                    first_at = time.perf_counter()
                    if self._ctx.settings.migration_learn_prefill and len(stitcher.legs) == 1:
                        prompt = len(stitcher.prompt_ids or [])
                        estimator = self._ctx.prefill_estimator(self._req.model)
                        estimator.observe(prompt, first_at - posted_at)
                if stitcher.done:
                    return "done"
        finally:
            move_wait.cancel()

    async def _relay_events(self, stitcher: StreamStitcher, events: bytes, send: Send) -> None:
        for payload in data_payloads(events):
            relayed = stitcher.feed(payload)
            if relayed.token_events:
                now = time.perf_counter()
                if self._first_token_at is None:
                    self._first_token_at = now
                if self._last_token_at is not None:
                    gap = now - self._last_token_at
                    self._max_gap = gap if self._max_gap is None else max(self._max_gap, gap)
                self._last_token_at = now
                self._token_events += relayed.token_events
            if relayed.data and self._req.stream:
                await self._body(send, relayed.data, more=True)

    async def _acquire(self, send: Send) -> InstanceView:
        dispatcher = self._ctx.dispatcher
        keepalive = self._ctx.settings.stream_keepalive_seconds if self._req.stream else None
        started = time.perf_counter()
        while True:
            instance = await dispatcher.wait(self._ticket, keepalive)
            if instance is not None:
                self._instance = instance
                self._queue_wait += time.perf_counter() - started
                return instance
            if keepalive is None:
                # Woken a hair before the deadline (the loop's timer and the dispatcher's
                # clock differ): wait again; only a stream may get keep-alives.
                continue
            # A streaming client has waited a keep-alive interval: commit the stream and
            # keep the connection visibly alive while the model starts.
            if not self._committed:
                await self._start(send, 200, SSE_HEADERS)
            await send({"type": "http.response.body", "body": KEEPALIVE, "more_body": True})

    async def _relay(self, response: aiohttp.ClientResponse, send: Send) -> None:
        content_type = response.headers.get("Content-Type", "application/json")
        is_stream = response.status == 200 and content_type.startswith("text/event-stream")
        if not is_stream:
            body = await response.read()
            if response.status >= 400:
                body = normalize_error_body(body, response.status)
            if self._committed:
                # The client already has a 200 event stream: the answer becomes events.
                payload = body if body.lstrip().startswith(b"{") else json.dumps(
                    errors.error_body(body.decode("utf-8", "replace"), errors.UPSTREAM)
                ).encode()  # fmt: skip
                await self._finish_stream(send, b"data: " + payload + b"\n\n" + b"data: [DONE]\n\n")
                return
            headers = [(b"content-type", content_type.encode("latin-1"))]
            await self._start(send, response.status, headers)
            await self._body(send, body, more=False)
            return
        if not self._committed:
            await self._start(send, 200, SSE_HEADERS)
        framer = EventFramer()
        saw_done = False
        try:
            async for chunk in response.content.iter_any():
                events = framer.feed(chunk)
                if not events:
                    continue
                tokens = count_token_events(events)
                if tokens:
                    now = time.perf_counter()
                    if self._first_token_at is None:
                        self._first_token_at = now
                    self._last_token_at = now
                    self._token_events += tokens
                if DONE_MARK in events:
                    saw_done = True
                await self._body(send, events, more=True)
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._stream_failed(send, f"the stream broke off: {exc!r}")
            return
        if framer.pending.strip() == DONE_MARK:
            saw_done = True
            await self._body(send, DONE_MARK + b"\n\n", more=True)
        if not saw_done:
            await self._stream_failed(send, "the stream ended without [DONE]")
            return
        await self._body(send, b"", more=False)

    async def _stream_failed(self, send: Send, detail: str) -> None:
        error = errors.upstream_failed(self._req.model, detail)
        log.warning(
            "upstream.stream_failed",
            model=self._req.model,
            request_id=self._req.request_id,
            instance=self._instance.name if self._instance else None,
            detail=detail,
        )
        self._ctx.metrics.rejections.labels(self._req.model, "upstream_stream_error").inc()
        self._status = 502
        await self._finish_stream(send, error_event(error))

    async def _send_error(self, send: Send, error: GatewayError) -> None:
        if self._committed:
            self._status = error.status
            await self._finish_stream(send, error_event(error))
            return
        headers = [(b"content-type", b"application/json")]
        headers += [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items()
        ]
        await self._start(send, error.status, headers)
        await self._body(send, json.dumps(error.body()).encode(), more=False)

    # --- ASGI plumbing ------------------------------------------------------------------

    async def _start(self, send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        headers = [*headers, (b"x-request-id", self._req.request_id.encode("latin-1"))]
        if self._instance is not None:
            headers.append((b"x-hydraserve-instance", self._instance.name.encode("latin-1")))
        self._status = status
        self._committed = True
        await send({"type": "http.response.start", "status": status, "headers": headers})

    async def _body(self, send: Send, data: bytes, *, more: bool) -> None:
        if not more or DONE_MARK in data:
            # Before sending: once the last message (or a stream's [DONE]) is out, the
            # client has the whole answer; a disconnect after it (the server reports one
            # after the last message, clients close right after [DONE]) is a success.
            self._response_complete = True
        await send({"type": "http.response.body", "body": data, "more_body": more})

    async def _finish_stream(self, send: Send, data: bytes) -> None:
        await self._body(send, data, more=False)

    # --- bookkeeping ----------------------------------------------------------------------

    def _record_slo(self, ttft: float) -> None:
        req, slo = self._req, self._ctx.slo
        if slo is None or req.ttft_slo_s is None or req.tpot_slo_s is None:
            return
        tpot = None
        if self._token_events > 1 and self._last_token_at is not None:
            assert self._first_token_at is not None
            tpot = (self._last_token_at - self._first_token_at) / (self._token_events - 1)
        outcome = slo.observe(
            req.model,
            time.time(),
            cold=req.cold,
            ttft_s=ttft,
            tpot_s=tpot,
            ttft_slo_s=req.ttft_slo_s,
            tpot_slo_s=req.tpot_slo_s,
        )
        start = "cold" if req.cold else "warm"
        counter = self._ctx.metrics.slo_requests
        counter.labels(req.model, "ttft", start, "met" if outcome.ttft_met else "missed").inc()
        if outcome.tpot_met is not None:
            counter.labels(req.model, "tpot", start, "met" if outcome.tpot_met else "missed").inc()

    def _record(self) -> None:
        req, metrics = self._req, self._ctx.metrics
        duration = time.perf_counter() - req.arrived_at
        status = str(self._status or CLIENT_CLOSED)
        metrics.child(metrics.requests, req.model, req.endpoint, status).inc()
        metrics.child(metrics.request_duration, req.model, req.endpoint).observe(duration)
        if self._first_token_at is not None:
            ttft = self._first_token_at - req.arrived_at
            metrics.child(metrics.ttft, req.model).observe(ttft)
            if self._token_events > 1 and self._last_token_at is not None:
                gap = (self._last_token_at - self._first_token_at) / (self._token_events - 1)
                metrics.child(metrics.tpot, req.model).observe(gap)
            self._record_slo(ttft)
        if self._ctx.settings.access_log:
            log.info(
                "request.done",
                model=req.model,
                endpoint=req.endpoint,
                status=int(status),
                instance=self._instance.name if self._instance else None,
                stream=req.stream,
                duration_ms=round(duration * 1000, 2),
                queue_ms=round(self._queue_wait * 1000, 2),
                request_id=req.request_id,
                key=req.key_name,
            )
