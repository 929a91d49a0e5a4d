"""Autoscaling: desired replicas from demand, scale-to-zero after keep-alive.

The decision is pure (:func:`desired_replicas` over the peak demand of the keep-alive
window, :class:`DemandWindow`); :class:`Autoscaler` is the thin loop that feeds it the
gateway's in-flight counts and sends changed decisions to ``ClusterBackend.scale``.

Using the *peak* in-flight count of the last ``keepAliveSeconds`` makes one rule cover
both scale-down and scale-to-zero: a replica is kept until the demand that needed it has
been gone for a whole keep-alive, so a short lull does not cost another cold start.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable

from hydraserve.api.models import ScalingSpec
from hydraserve.backends.base import ClusterBackend, ModelView
from hydraserve.gateway.catalog import model_id
from hydraserve.logs import get_logger

log = get_logger("gateway.autoscaler")

# A scale request the backend has not reflected yet is trusted for this long, then re-sent.
REQUEST_TRUST_SECONDS = 10.0


def desired_replicas(scaling: ScalingSpec, peak_in_flight: int) -> int:
    """ceil(peak in-flight / targetConcurrency), within [minReplicas, maxReplicas].

    Zero demand gives ``minReplicas`` (0 = scale to zero). Any demand gives at least one
    replica even when ``minReplicas`` is 0; ``minReplicas`` wins over ``maxReplicas`` if an
    operator set them crossed.
    """
    if peak_in_flight <= 0:
        return scaling.min_replicas
    needed = math.ceil(peak_in_flight / scaling.target_concurrency)
    return max(scaling.min_replicas, min(scaling.max_replicas, needed))


class DemandWindow:
    """The peak of a step function (in-flight requests) over a sliding time window.

    Each change records the value that just *ended*, with the time it ended, so a value
    that held into the window counts even though it started before it. A monotonic deque
    keeps the query O(1) amortised.
    """

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()  # (ended at, value), values falling

    def record(self, ended_at: float, value: int) -> None:
        while self._samples and self._samples[-1][1] <= value:
            self._samples.pop()
        self._samples.append((ended_at, value))

    def peak(self, now: float, window: float, current: int) -> int:
        start = now - window
        while self._samples and self._samples[0][0] < start:
            self._samples.popleft()
        return max(current, self._samples[0][1]) if self._samples else current


class Autoscaler:
    """Feeds demand into :func:`desired_replicas` and applies changed decisions."""

    def __init__(
        self,
        backend: ClusterBackend,
        in_flight: Callable[[str], int],
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
        on_decision: Callable[[str, int], None] | None = None,
    ) -> None:
        self._backend = backend
        self._in_flight = in_flight
        self._interval = interval
        self._clock = clock
        self._on_decision = on_decision
        self._windows: dict[str, DemandWindow] = {}
        self._requested: dict[str, tuple[int, float]] = {}  # model -> (replicas, when)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # --- inputs ---------------------------------------------------------------------

    def record(self, view: ModelView, old: int, new: int) -> None:
        """The model's in-flight count went from ``old`` to ``new``; scale up at once if
        the new demand needs more replicas than asked for (cold starts must not wait for
        the next tick)."""
        now = self._clock()
        self._window(view, now).record(now, old)
        if new > old and desired_replicas(view.model.spec.scaling, new) > self._believed(view):
            task = asyncio.get_running_loop().create_task(self.apply(model_id(view)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # --- decisions --------------------------------------------------------------------

    def decide(self, view: ModelView, now: float) -> int:
        window = self._window(view, now)
        scaling = view.model.spec.scaling
        peak = window.peak(now, scaling.keep_alive_seconds, self._in_flight(model_id(view)))
        return desired_replicas(scaling, peak)

    async def apply(self, model: str) -> None:
        """Decide for one model and send the decision if it changed. Serialised per model
        so a scale-down and a scale-up cannot overtake each other on the way out."""
        lock = self._locks.setdefault(model, asyncio.Lock())
        async with lock:
            view = self._backend.get_model(model)
            if view is None or view.error is not None:
                return
            now = self._clock()
            desired = self.decide(view, now)
            if self._on_decision is not None:
                self._on_decision(model, desired)
            if desired == self._believed(view):
                return
            log.info(
                "autoscale.decision",
                model=model,
                replicas=desired,
                previous=view.desired_replicas,
                in_flight=self._in_flight(model),
            )
            try:
                await self._backend.scale(model, desired)
            except Exception as exc:  # the next tick tries again
                log.error("autoscale.scale_failed", model=model, replicas=desired, error=repr(exc))
                return
            self._requested[model] = (desired, self._clock())

    async def tick(self) -> None:
        models = self._backend.list_models()
        for view in models:
            await self.apply(model_id(view))
        present = {model_id(view) for view in models}
        for gone in set(self._windows) - present:
            self._windows.pop(gone, None)
            self._requested.pop(gone, None)
            self._locks.pop(gone, None)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as exc:  # a failing backend must not stop the loop
                log.error("autoscale.tick_failed", error=repr(exc))
            await asyncio.sleep(self._interval)

    # --- helpers ----------------------------------------------------------------------

    def _window(self, view: ModelView, now: float) -> DemandWindow:
        window = self._windows.get(model_id(view))
        if window is None:
            window = self._windows[model_id(view)] = DemandWindow()
            # Replicas that exist when the gateway (re)starts are kept for one keep-alive,
            # as if the demand that asked for them had just ended.
            scaling = view.model.spec.scaling
            window.record(now, view.desired_replicas * scaling.target_concurrency)
        return window

    def _believed(self, view: ModelView) -> int:
        """Replicas currently asked for: our own recent request, else the backend's view."""
        requested = self._requested.get(model_id(view))
        if requested is not None and self._clock() - requested[1] < REQUEST_TRUST_SECONDS:
            return requested[0]
        return view.desired_replicas
