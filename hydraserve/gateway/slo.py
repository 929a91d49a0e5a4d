"""Live SLO attainment per model: which requests met the model's TTFT and TPOT SLOs over a
sliding window, cold (waited for an instance to start) and warm apart.

Pure bookkeeping; the proxy feeds it one outcome per request that produced a token, the
gateway shows it in ``GET /v1/models/{id}`` and hands it to the backend for the model's
status. Memory is bounded by the window (old outcomes are dropped as they age out).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from hydraserve.api.models import AttainmentStatus, SloAttainmentStatus


@dataclass(frozen=True)
class Outcome:
    at: float
    cold: bool
    ttft_met: bool
    tpot_met: bool | None  # None: one token, no TPOT


def _attainment(met: int, missed: int) -> AttainmentStatus:
    total = met + missed
    return AttainmentStatus(met=met, missed=missed, ratio=met / total if total else None)


class SloWindow:
    def __init__(self, window_seconds: float) -> None:
        self.window_seconds = window_seconds
        self._outcomes: dict[str, deque[Outcome]] = {}

    def observe(
        self,
        model: str,
        at: float,
        *,
        cold: bool,
        ttft_s: float,
        tpot_s: float | None,
        ttft_slo_s: float,
        tpot_slo_s: float,
    ) -> Outcome:
        outcome = Outcome(
            at=at,
            cold=cold,
            ttft_met=ttft_s <= ttft_slo_s,
            tpot_met=None if tpot_s is None else tpot_s <= tpot_slo_s,
        )
        self._outcomes.setdefault(model, deque()).append(outcome)
        return outcome

    def attainment(self, model: str, now: float) -> SloAttainmentStatus | None:
        """The window's attainment for ``model``; None if it served nothing in the window."""
        outcomes = self._outcomes.get(model)
        if outcomes is None:
            return None
        while outcomes and outcomes[0].at < now - self.window_seconds:
            outcomes.popleft()
        if not outcomes:
            return None
        counts = {key: [0, 0] for key in ("ttft_cold", "ttft_warm", "tpot_cold", "tpot_warm")}
        for o in outcomes:
            kind = "cold" if o.cold else "warm"
            counts[f"ttft_{kind}"][0 if o.ttft_met else 1] += 1
            if o.tpot_met is not None:
                counts[f"tpot_{kind}"][0 if o.tpot_met else 1] += 1
        return SloAttainmentStatus(
            window_seconds=self.window_seconds,
            updated_at=now,
            **{key: _attainment(*value) for key, value in counts.items()},
        )

    def models(self) -> list[str]:
        return list(self._outcomes)
