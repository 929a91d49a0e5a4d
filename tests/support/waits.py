"""Waiting on what the code under test reports, never on the clock.

A test that asserts that something did *not* happen must first wait for an event after
which it would have happened: here, that the control loop completed more passes over the
state the test set up. The operator's :class:`~hydraserve.operator.reconciler.Reconciler`
and the embedded :class:`~hydraserve.backends.local.LocalBackend` count their completed
reconcile passes (``.passes``) for this.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol


class CountsPasses(Protocol):
    @property
    def passes(self) -> int: ...


async def passes_completed(
    loop: CountsPasses,
    more: int = 2,
    *,
    kick: Callable[[], Awaitable[object]] | None = None,
    timeout: float = 15.0,
    what: str = "",
) -> None:
    """Return once ``loop`` completed ``more`` reconcile passes after this call.

    Passes over one model are serialised, so with ``more >= 2`` the last of them *started*
    after this call and saw everything the test did before it: whatever it would have
    done (create, promote, delete) is done when this returns. ``kick`` starts a pass (or
    joins one already queued), for loops that otherwise wait for a slow timer; every
    trigger of a reconcile loop ends in the same idempotent pass, so a kicked pass is one
    the loop would have run anyway.
    """
    target = loop.passes + more
    deadline = time.monotonic() + timeout
    while loop.passes < target:
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what or type(loop).__name__}: {more} reconcile passes did not complete "
                f"within {timeout} s (at {loop.passes}, waiting for {target})"
            )
        if kick is not None:
            await kick()
        # Yield to the loop: a kick that joined a queued pass returns at once.
        await asyncio.sleep(0.01)


class ReconcilesModels(Protocol):
    @property
    def passes(self) -> int: ...

    async def reconcile(self, namespace: str, name: str) -> object: ...


async def operator_passes(
    reconciler: ReconcilesModels,
    namespace: str,
    name: str,
    more: int = 2,
    *,
    kick: bool = True,
    timeout: float = 15.0,
) -> None:
    """:func:`passes_completed` for the operator's reconciler and one model; with ``kick``
    the test runs the passes itself (the reconciler serialises them with kopf's) instead of
    waiting for the next trigger (a resync can be a minute away)."""
    await passes_completed(
        reconciler,
        more,
        kick=(lambda: reconciler.reconcile(namespace, name)) if kick else None,
        timeout=timeout,
        what=f"the operator's reconciler ({namespace}/{name})",
    )


async def parked(*tasks: asyncio.Task[Any]) -> None:
    """Let tasks the test just created run until each waits on something, and check that
    none has finished. One turn of the event loop is enough and needs no clock: asyncio
    runs the ready tasks first, in creation order, before this coroutine resumes."""
    await asyncio.sleep(0)
    finished = [task.get_name() for task in tasks if task.done()]
    assert not finished, f"expected these tasks to wait, but they finished: {finished}"
