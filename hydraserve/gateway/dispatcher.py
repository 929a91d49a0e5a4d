"""The per-model queue and instance leases (the I/O side of admission and routing).

A :class:`Ticket` is one accepted request's place in the gateway. It either holds a lease
on an instance (counted in that instance's outstanding requests) or waits in its model's
FIFO queue with a deadline. Whatever happens to the request, :meth:`Dispatcher.close`
runs exactly once for it and frees its queue slot or lease, so a cancelled, failed or
disconnected request never keeps capacity.

While a model has waiting requests, one watcher task follows the backend
(``wait_for_change``) and hands freed or new capacity to the head of the queue.

Requests that can move between instances (on a pipeline that may be consolidated) ask
:meth:`Dispatcher.watch_move` for an event; while any exist, another watcher sets a
request's event when its instance stops being Ready (drains, fails, goes away) and another
Ready instance exists, and :meth:`Dispatcher.move` moves its lease there.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections import deque
from collections.abc import Callable

from hydraserve.backends.base import ClusterBackend, InstancePhase, InstanceView, ModelView
from hydraserve.gateway import errors
from hydraserve.gateway.admission import Admission, admit, describe_progress
from hydraserve.gateway.catalog import model_id
from hydraserve.gateway.metrics import GatewayMetrics
from hydraserve.gateway.router import choose_instance
from hydraserve.gateway.settings import GatewaySettings
from hydraserve.logs import get_logger

log = get_logger("gateway.dispatcher")

InFlightListener = Callable[[ModelView, int, int], None]


class ModelRuntime:
    """The gateway's live state for one model."""

    def __init__(self, view: ModelView, metrics: GatewayMetrics) -> None:
        self.name = model_id(view)
        self.view = view
        self.queue: deque[Ticket] = deque()
        self.in_flight = 0
        self.outstanding: dict[str, int] = {}
        self.unreachable: dict[str, float] = {}  # instance -> skipped until (monotonic)
        self.watcher: asyncio.Task[None] | None = None
        self.movable: dict[Ticket, asyncio.Event] = {}  # requests that may move, and their
        self.move_watcher: asyncio.Task[None] | None = None  # "move now" events
        self.queue_depth_gauge = metrics.queue_depth.labels(self.name)
        self.in_flight_gauge = metrics.in_flight.labels(self.name)
        self.queue_wait_histogram = metrics.queue_wait.labels(self.name)


class Ticket:
    __slots__ = (
        "admitted_at",
        "attempts",
        "closed",
        "deadline",
        "future",
        "instance",
        "queued_at",
        "runtime",
    )

    def __init__(self, runtime: ModelRuntime, admitted_at: float, deadline: float) -> None:
        self.runtime = runtime
        self.admitted_at = admitted_at
        self.deadline = deadline
        self.instance: InstanceView | None = None
        self.future: asyncio.Future[InstanceView] | None = None
        self.queued_at = 0.0
        self.attempts = 1
        self.closed = False

    @property
    def model(self) -> str:
        return self.runtime.name


class Dispatcher:
    def __init__(
        self,
        backend: ClusterBackend,
        settings: GatewaySettings,
        metrics: GatewayMetrics,
        *,
        on_in_flight: InFlightListener | None = None,
        on_view: Callable[[ModelView], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._metrics = metrics
        self._on_in_flight = on_in_flight
        self._on_view = on_view
        self._clock = clock
        self._runtimes: dict[str, ModelRuntime] = {}

    # --- queries -------------------------------------------------------------------

    @property
    def backend(self) -> ClusterBackend:
        return self._backend

    def in_flight(self, model: str) -> int:
        runtime = self._runtimes.get(model)
        return runtime.in_flight if runtime is not None else 0

    def queue_length(self, model: str) -> int:
        runtime = self._runtimes.get(model)
        return len(runtime.queue) if runtime is not None else 0

    def outstanding(self, model: str) -> dict[str, int]:
        runtime = self._runtimes.get(model)
        return dict(runtime.outstanding) if runtime is not None else {}

    # --- the life of a ticket ----------------------------------------------------------

    def admit(self, view: ModelView) -> Ticket:
        """Accept a request (leased at once, or queued) or raise 429 when the queue is full."""
        runtime = self._runtime(view)
        now = self._clock()
        instance = None
        if not runtime.queue:
            instance = self._choose(runtime, view, now)
        decision = admit(
            len(runtime.queue), self._settings.queue_size_per_model, instance is not None
        )
        if decision == Admission.REJECT:
            self._metrics.rejections.labels(runtime.name, "queue_full").inc()
            raise errors.queue_full(
                runtime.name,
                self._settings.queue_size_per_model,
                self._settings.queue_full_retry_after_seconds,
            )
        ticket = Ticket(runtime, now, now + self._settings.queue_timeout_seconds)
        if instance is not None:
            self._lease(ticket, instance)
            runtime.queue_wait_histogram.observe(0.0)
        else:
            self._enqueue(ticket, front=False)
        self._change_in_flight(runtime, +1)
        return ticket

    async def wait(self, ticket: Ticket, max_wait: float | None = None) -> InstanceView | None:
        """The ticket's instance; ``None`` if ``max_wait`` passed first (the caller may send
        a keep-alive and call again). Raises the 503 when the deadline passes first, or the
        error that made the model unservable."""
        if ticket.instance is not None:
            return ticket.instance
        future = ticket.future
        assert future is not None, "a ticket without an instance is queued"
        now = self._clock()
        remaining = ticket.deadline - now
        timeout = remaining if max_wait is None else min(remaining, max_wait)
        if timeout > 0 and not future.done():
            await asyncio.wait((future,), timeout=timeout)
        if future.done():
            # A result or an exception set by pump(); raises the latter.
            return future.result()
        if self._clock() < ticket.deadline:
            return None
        self._dequeue(ticket)
        runtime = ticket.runtime
        self._metrics.rejections.labels(runtime.name, "queue_timeout").inc()
        detail = describe_progress(self._backend.get_model(runtime.name))
        waited = self._clock() - ticket.admitted_at
        log.warning("queue.timeout", model=runtime.name, waited_s=round(waited, 3), detail=detail)
        raise errors.wait_timeout(
            runtime.name,
            waited,
            self._settings.timeout_retry_after_seconds,
            detail,
        )

    def retry_elsewhere(self, ticket: Ticket) -> None:
        """The leased instance refused the connection (the request never started): skip it
        for a while and put the request back at the head of the queue, whatever the
        queue's size, since it was already accepted. Raises 503 after too many tries."""
        runtime = ticket.runtime
        failed = ticket.instance
        assert failed is not None
        self._release(ticket)
        runtime.unreachable[failed.name] = (
            self._clock() + self._settings.unreachable_cooldown_seconds
        )
        self._metrics.upstream_retries.labels(runtime.name).inc()
        log.warning("upstream.unreachable", model=runtime.name, instance=failed.name,
                    endpoint=failed.endpoint, attempt=ticket.attempts)  # fmt: skip
        if ticket.attempts >= self._settings.connect_attempts:
            self._metrics.rejections.labels(runtime.name, "no_reachable_instance").inc()
            raise errors.no_reachable_instance(
                runtime.name, ticket.attempts, self._settings.timeout_retry_after_seconds
            )
        ticket.attempts += 1
        self._enqueue(ticket, front=True)

    # --- moving running requests --------------------------------------------------------

    def watch_move(self, ticket: Ticket) -> asyncio.Event:
        """An event set when the ticket's instance stops being Ready while another Ready
        instance exists (the request should then move; see :meth:`move`)."""
        runtime = ticket.runtime
        event = asyncio.Event()
        runtime.movable[ticket] = event
        with contextlib.suppress(Exception):
            view = self._backend.get_model(runtime.name)
            if view is not None:
                self._check_moves(runtime, view)
        if runtime.move_watcher is None:
            runtime.move_watcher = asyncio.get_running_loop().create_task(
                self._watch_moves(runtime)
            )
        return event

    def unwatch_move(self, ticket: Ticket) -> None:
        ticket.runtime.movable.pop(ticket, None)

    def move(self, ticket: Ticket) -> InstanceView | None:
        """Move the ticket's lease to another Ready instance (least loaded; over the
        per-instance cap if need be: the request was admitted long ago). None if there
        is none; the lease then stays."""
        runtime = ticket.runtime
        current = ticket.instance
        try:
            view = self._backend.get_model(runtime.name)
        except Exception as exc:
            log.error("backend.get_model_failed", model=runtime.name, error=repr(exc))
            return None
        if view is None:
            return None
        exclude = {current.name} if current is not None else set()
        target = self._move_target(runtime, view, exclude)
        if target is None:
            return None
        self._release(ticket)
        self._lease(ticket, target)
        return target

    def _move_target(
        self, runtime: ModelRuntime, view: ModelView, exclude: set[str]
    ) -> InstanceView | None:
        unreachable = set(runtime.unreachable) | exclude
        capacity = self._settings.max_outstanding_per_instance
        return choose_instance(
            view.instances, runtime.outstanding, capacity, unreachable
        ) or choose_instance(view.instances, runtime.outstanding, sys.maxsize, unreachable)

    def _check_moves(self, runtime: ModelRuntime, view: ModelView) -> None:
        if not runtime.movable:
            return
        phases = {i.name: i.phase for i in view.instances}
        for ticket, event in runtime.movable.items():
            leased = ticket.instance
            if event.is_set() or leased is None:
                continue
            if phases.get(leased.name) == InstancePhase.READY:
                continue
            if self._move_target(runtime, view, {leased.name}) is not None:
                event.set()

    async def _watch_moves(self, runtime: ModelRuntime) -> None:
        poll = self._settings.watch_poll_seconds
        try:
            while runtime.movable:
                try:
                    await self._backend.wait_for_change(runtime.name, poll)
                    view = self._backend.get_model(runtime.name)
                except Exception as exc:
                    log.error("backend.wait_failed", model=runtime.name, error=repr(exc))
                    await asyncio.sleep(poll)
                    continue
                if view is not None:
                    self._check_moves(runtime, view)
        finally:
            runtime.move_watcher = None

    def close(self, ticket: Ticket) -> None:
        """The request is over (answered, failed or abandoned). Idempotent."""
        if ticket.closed:
            return
        ticket.closed = True
        runtime = ticket.runtime
        runtime.movable.pop(ticket, None)
        if ticket.instance is not None:
            self._release(ticket)
        else:
            self._dequeue(ticket)
        self._change_in_flight(runtime, -1)
        if runtime.queue:
            self.pump(runtime)

    # --- moving the queue ---------------------------------------------------------------

    def pump(self, runtime: ModelRuntime) -> None:
        """Hand capacity to waiting requests in FIFO order; fail them all if the model went
        away or cannot start."""
        if not runtime.queue:
            return
        try:
            view = self._backend.get_model(runtime.name)
        except Exception as exc:  # keep waiting; the deadline bounds it
            log.error("backend.get_model_failed", model=runtime.name, error=repr(exc))
            return
        if view is None or view.error is not None:
            error = (
                errors.model_not_found(runtime.name)
                if view is None
                else errors.model_unavailable(runtime.name, view.error or "")
            )
            reason = "model_deleted" if view is None else "model_unavailable"
            while runtime.queue:
                ticket = runtime.queue.popleft()
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_exception(error)
                    self._metrics.rejections.labels(runtime.name, reason).inc()
            runtime.queue_depth_gauge.set(0)
            return
        runtime.view = view
        if self._on_view is not None:
            self._on_view(view)
        self._check_moves(runtime, view)
        now = self._clock()
        while runtime.queue:
            instance = self._choose(runtime, view, now)
            if instance is None:
                break
            ticket = runtime.queue.popleft()
            assert ticket.future is not None
            self._lease(ticket, instance)
            ticket.future.set_result(instance)
            runtime.queue_wait_histogram.observe(now - ticket.queued_at)
        runtime.queue_depth_gauge.set(len(runtime.queue))

    async def _watch(self, runtime: ModelRuntime) -> None:
        poll = self._settings.watch_poll_seconds
        try:
            while runtime.queue:
                try:
                    await self._backend.wait_for_change(runtime.name, poll)
                except Exception as exc:
                    log.error("backend.wait_failed", model=runtime.name, error=repr(exc))
                    await asyncio.sleep(poll)
                self.pump(runtime)
        finally:
            runtime.watcher = None

    async def close_all(self) -> None:
        watchers = [r.watcher for r in self._runtimes.values() if r.watcher is not None]
        watchers += [r.move_watcher for r in self._runtimes.values() if r.move_watcher]
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)

    # --- helpers ------------------------------------------------------------------------

    def _runtime(self, view: ModelView) -> ModelRuntime:
        key = model_id(view)  # per namespace: same-named models of two tenants stay apart
        runtime = self._runtimes.get(key)
        if runtime is None:
            runtime = self._runtimes[key] = ModelRuntime(view, self._metrics)
        else:
            runtime.view = view
        return runtime

    def _choose(self, runtime: ModelRuntime, view: ModelView, now: float) -> InstanceView | None:
        unreachable = runtime.unreachable
        if unreachable:
            for name in [n for n, until in unreachable.items() if until <= now]:
                del unreachable[name]
        return choose_instance(
            view.instances,
            runtime.outstanding,
            self._settings.max_outstanding_per_instance,
            unreachable,
        )

    def _lease(self, ticket: Ticket, instance: InstanceView) -> None:
        ticket.instance = instance
        outstanding = ticket.runtime.outstanding
        outstanding[instance.name] = outstanding.get(instance.name, 0) + 1

    def _release(self, ticket: Ticket) -> None:
        instance = ticket.instance
        if instance is None:
            return
        ticket.instance = None
        outstanding = ticket.runtime.outstanding
        left = outstanding.get(instance.name, 1) - 1
        if left > 0:
            outstanding[instance.name] = left
        else:
            outstanding.pop(instance.name, None)

    def _enqueue(self, ticket: Ticket, *, front: bool) -> None:
        runtime = ticket.runtime
        ticket.future = asyncio.get_running_loop().create_future()
        ticket.queued_at = self._clock()
        if front:
            runtime.queue.appendleft(ticket)
        else:
            runtime.queue.append(ticket)
        self.pump(runtime)
        if runtime.queue and runtime.watcher is None:
            runtime.watcher = asyncio.get_running_loop().create_task(self._watch(runtime))
        runtime.queue_depth_gauge.set(len(runtime.queue))

    def _dequeue(self, ticket: Ticket) -> None:
        runtime = ticket.runtime
        with contextlib.suppress(ValueError):  # already taken off by pump()
            runtime.queue.remove(ticket)
        if ticket.future is not None and not ticket.future.done():
            ticket.future.cancel()
        runtime.queue_depth_gauge.set(len(runtime.queue))

    def _change_in_flight(self, runtime: ModelRuntime, delta: int) -> None:
        old = runtime.in_flight
        runtime.in_flight = old + delta
        runtime.in_flight_gauge.set(runtime.in_flight)
        if self._on_in_flight is not None:
            self._on_in_flight(runtime.view, old, runtime.in_flight)
