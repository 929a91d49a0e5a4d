"""The queue and leases, driven directly (no HTTP)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from hydraserve.backends.base import InstancePhase, InstanceView, ModelView
from hydraserve.gateway.catalog import Catalog
from hydraserve.gateway.dispatcher import Dispatcher, Ticket
from hydraserve.gateway.errors import GatewayError
from hydraserve.gateway.metrics import GatewayMetrics
from tests.support.fakes import FakeClusterBackend, make_model, ready_instance
from tests.support.waits import parked

from .conftest import eventually, fast_settings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def setup(**settings: Any) -> tuple[FakeClusterBackend, Dispatcher, list[tuple[int, int]]]:
    backend = FakeClusterBackend([make_model("m")])
    changes: list[tuple[int, int]] = []
    dispatcher = Dispatcher(
        Catalog(backend),  # as the gateway does: queues by canonical id
        fast_settings(**settings),
        GatewayMetrics(),
        on_in_flight=lambda view, old, new: changes.append((old, new)),
    )
    return backend, dispatcher, changes


def view(backend: FakeClusterBackend) -> ModelView:
    found = backend.get_model("m")
    assert found is not None
    return found


async def test_a_ready_instance_is_leased_at_once() -> None:
    backend, dispatcher, changes = setup()
    backend.set_instances("m", [ready_instance("m", "m-0", "http://a")])
    ticket = dispatcher.admit(view(backend))
    instance = await dispatcher.wait(ticket)
    assert instance is not None and instance.name == "m-0"
    assert dispatcher.outstanding("default/m") == {"m-0": 1}
    assert changes == [(0, 1)]
    dispatcher.close(ticket)
    dispatcher.close(ticket)  # idempotent
    assert dispatcher.outstanding("default/m") == {}
    assert dispatcher.in_flight("default/m") == 0
    assert changes == [(0, 1), (1, 0)]


async def test_waiters_are_released_in_order_when_an_instance_becomes_ready() -> None:
    backend, dispatcher, _ = setup()
    tickets = [dispatcher.admit(view(backend)) for _ in range(3)]
    assert dispatcher.queue_length("default/m") == 3
    order: list[int] = []

    async def waiter(i: int, ticket: Ticket) -> None:
        await dispatcher.wait(ticket)
        order.append(i)

    tasks = [asyncio.create_task(waiter(i, t)) for i, t in enumerate(tickets)]
    await parked(*tasks)  # each waits in the queue: nothing is ready yet
    assert order == []
    backend.set_instances("m", [ready_instance("m", "m-0", "http://a")])
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert dispatcher.queue_length("default/m") == 0
    assert dispatcher.outstanding("default/m") == {"m-0": 3}


async def test_a_full_queue_refuses_with_429_and_retry_after() -> None:
    backend, dispatcher, _ = setup(queue_size_per_model=2, queue_full_retry_after_seconds=7)
    dispatcher.admit(view(backend))
    dispatcher.admit(view(backend))
    with pytest.raises(GatewayError) as refused:
        dispatcher.admit(view(backend))
    assert refused.value.status == 429
    assert refused.value.headers["Retry-After"] == "7"
    assert refused.value.code == "queue_full"
    assert dispatcher.in_flight("default/m") == 2  # the refused request was never counted


async def test_the_deadline_answers_503_with_retry_after_and_frees_the_slot() -> None:
    backend, dispatcher, _ = setup(queue_timeout_seconds=0.05, timeout_retry_after_seconds=9)
    ticket = dispatcher.admit(view(backend))
    with pytest.raises(GatewayError) as timed_out:
        await dispatcher.wait(ticket)
    assert timed_out.value.status == 503
    assert timed_out.value.headers["Retry-After"] == "9"
    assert "starting" in timed_out.value.message
    assert dispatcher.queue_length("default/m") == 0
    dispatcher.close(ticket)
    assert dispatcher.in_flight("default/m") == 0


async def test_wait_with_max_wait_returns_none_so_the_caller_can_keep_alive() -> None:
    backend, dispatcher, _ = setup()
    ticket = dispatcher.admit(view(backend))
    assert await dispatcher.wait(ticket, max_wait=0.01) is None
    assert dispatcher.queue_length("default/m") == 1  # still waiting
    backend.set_instances("m", [ready_instance("m", "m-0", "http://a")])
    instance = await dispatcher.wait(ticket, max_wait=5)
    assert instance is not None


async def test_closing_a_waiting_ticket_frees_its_place() -> None:
    backend, dispatcher, _ = setup(queue_size_per_model=1)
    ticket = dispatcher.admit(view(backend))
    dispatcher.close(ticket)
    assert dispatcher.queue_length("default/m") == 0 and dispatcher.in_flight("default/m") == 0
    dispatcher.admit(view(backend))  # the slot is usable again


async def test_a_model_that_cannot_start_fails_its_waiters_at_once() -> None:
    backend, dispatcher, _ = setup()
    ticket = dispatcher.admit(view(backend))
    waiting = asyncio.create_task(dispatcher.wait(ticket))
    await parked(waiting)
    backend.set_error("m", "model not found in the store at /models/m")
    with pytest.raises(GatewayError) as failed:
        await waiting
    assert failed.value.status == 503 and failed.value.code == "model_unavailable"
    assert "not found in the store" in failed.value.message


async def test_a_deleted_model_fails_its_waiters_with_404() -> None:
    backend, dispatcher, _ = setup()
    ticket = dispatcher.admit(view(backend))
    waiting = asyncio.create_task(dispatcher.wait(ticket))
    await parked(waiting)
    backend.remove_model("m")
    with pytest.raises(GatewayError) as failed:
        await waiting
    assert failed.value.status == 404


async def test_requests_beyond_the_instance_cap_wait_for_a_free_slot() -> None:
    backend, dispatcher, _ = setup(max_outstanding_per_instance=2)
    backend.set_instances("m", [ready_instance("m", "m-0", "http://a")])
    first, second = dispatcher.admit(view(backend)), dispatcher.admit(view(backend))
    third = dispatcher.admit(view(backend))
    assert third.instance is None and dispatcher.queue_length("default/m") == 1
    dispatcher.close(first)
    instance = await dispatcher.wait(third, max_wait=1)
    assert instance is not None and instance.name == "m-0"
    assert dispatcher.outstanding("default/m") == {"m-0": 2}
    dispatcher.close(second)
    dispatcher.close(third)


async def test_retry_skips_the_unreachable_instance_and_keeps_the_request_first() -> None:
    backend, dispatcher, _ = setup(queue_size_per_model=1)
    old = ready_instance("m", "m-0", "http://dead")
    backend.set_instances("m", [old])
    ticket = dispatcher.admit(view(backend))
    dispatcher.retry_elsewhere(ticket)
    # The only instance is skipped, so the request waits — even though that fills the
    # queue, it was accepted already and stays at the head.
    assert ticket.instance is None and dispatcher.queue_length("default/m") == 1
    with pytest.raises(GatewayError):
        dispatcher.admit(view(backend))
    replacement = ready_instance("m", "m-1", "http://new")
    backend.set_instances("m", [old, replacement])
    instance = await dispatcher.wait(ticket, max_wait=5)
    assert instance is not None and instance.name == "m-1"


async def test_retries_are_bounded() -> None:
    backend, dispatcher, _ = setup(connect_attempts=2, unreachable_cooldown_seconds=0)
    backend.set_instances("m", [ready_instance("m", "m-0", "http://dead")])
    ticket = dispatcher.admit(view(backend))
    dispatcher.retry_elsewhere(ticket)
    await dispatcher.wait(ticket, max_wait=1)
    with pytest.raises(GatewayError) as exhausted:
        dispatcher.retry_elsewhere(ticket)
    assert exhausted.value.status == 503 and exhausted.value.code == "no_reachable_instance"
    dispatcher.close(ticket)
    assert dispatcher.in_flight("default/m") == 0 and dispatcher.outstanding("default/m") == {}


async def test_a_lost_wakeup_is_recovered_by_the_poll() -> None:
    """A backend whose wait_for_change never fires (e.g. it polls an API) still gets its
    waiters served, through the watcher's poll."""

    class Deaf(FakeClusterBackend):
        async def wait_for_change(self, name: str, timeout: float) -> None:
            await asyncio.sleep(timeout)

    backend = Deaf([make_model("m")])
    dispatcher = Dispatcher(
        Catalog(backend), fast_settings(watch_poll_seconds=0.02), GatewayMetrics()
    )
    ticket = dispatcher.admit(backend.get_model("m"))  # type: ignore[arg-type]
    backend.set_instances("m", [ready_instance("m", "m-0", "http://a")])
    assert await dispatcher.wait(ticket, max_wait=5) is not None


async def test_the_watcher_stops_when_nobody_waits() -> None:
    backend, dispatcher, _ = setup()
    ticket = dispatcher.admit(view(backend))
    runtime = ticket.runtime
    assert runtime.watcher is not None
    dispatcher.close(ticket)
    await eventually(lambda: runtime.watcher is None, what="watcher exits")


def test_starting_instances_are_not_leased() -> None:
    async def run() -> None:
        backend, dispatcher, _ = setup()
        starting = InstanceView(
            name="m-0", model="m", pp=1, phase=InstancePhase.STARTING, endpoint="http://a"
        )
        backend.set_instances("m", [starting])
        ticket = dispatcher.admit(view(backend))
        assert ticket.instance is None
        dispatcher.close(ticket)

    asyncio.run(run())
