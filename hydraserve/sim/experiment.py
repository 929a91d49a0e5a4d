"""Experiments on the simulator: the paper's end-to-end setting, pooled over seeds.

Used by ``hydraserve bench sim`` and ``benchmarks/slo_attainment``. The defaults are the
reference setting of the SLO-attainment benchmark (see its README for why):

* cluster: :func:`paper_testbed` with two storage servers of 32 Gbps (64 Gbps in all);
* workload: 384 models (64 per application and size class), one hour, Zipf popularity
  with exponent 0.8 — calibrated so that the serverless-vLLM baseline lands on the
  paper's measured attainment at CV 2 / 0.6 req/s (46.7 %); nothing is tuned on
  HydraServe.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydraserve.sim.cluster import ClusterSpec, paper_testbed
from hydraserve.sim.policies import POLICIES, Policy
from hydraserve.sim.simulator import SimConfig, SimResult, simulate
from hydraserve.sim.workload import DEFAULT_POPULARITY_EXPONENT, make_workload

REFERENCE_MODELS = 384
REFERENCE_POPULARITY = DEFAULT_POPULARITY_EXPONENT
REFERENCE_STORE_GBPS = 64.0
REFERENCE_DURATION_S = 3600.0


def reference_cluster() -> ClusterSpec:
    return paper_testbed(store_gbps=REFERENCE_STORE_GBPS)


@dataclass
class CellResult:
    """One (policy, CV, rate) cell, pooled over seeds."""

    policy: str
    cv: float
    rate: float
    runs: list[SimResult] = field(default_factory=list)

    def _pooled(self, attr: str) -> float:
        requests = sum(len(r.requests) for r in self.runs)
        ok = sum(getattr(r, attr) * len(r.requests) for r in self.runs)
        return ok / requests if requests else 1.0

    @property
    def ttft_attainment(self) -> float:
        return self._pooled("ttft_attainment")

    @property
    def tpot_attainment(self) -> float:
        return self._pooled("tpot_attainment")

    @property
    def cost_per_request_gb_s(self) -> float:
        requests = sum(len(r.requests) for r in self.runs)
        return sum(r.cost_gb_s for r in self.runs) / requests if requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        summaries = [r.summary() for r in self.runs]
        cold = sum(s["cold_starts"] for s in summaries)
        pp_hist: dict[str, int] = {}
        for s in summaries:
            for pp, n in s["pp_histogram"].items():
                pp_hist[pp] = pp_hist.get(pp, 0) + n
        return {
            "policy": self.policy,
            "cv": self.cv,
            "rate": self.rate,
            "seeds": len(self.runs),
            "requests": sum(s["requests"] for s in summaries),
            "ttft_attainment": round(self.ttft_attainment, 4),
            "tpot_attainment": round(self.tpot_attainment, 4),
            "cost_gb_s_per_request": round(self.cost_per_request_gb_s, 1),
            "ttft_attainment_per_seed": [round(s["ttft_attainment"], 4) for s in summaries],
            "cold_starts": cold,
            "cold_start_mean_s": round(
                sum(s["cold_start_mean_s"] * s["cold_starts"] for s in summaries) / cold, 2
            )
            if cold
            else 0.0,
            "cold_starts_from_cache": sum(s["cold_starts_from_cache"] for s in summaries),
            "fallback_plans": sum(s["fallback_plans"] for s in summaries),
            "pp_histogram": dict(sorted(pp_hist.items())),
            "sim_wall_seconds": round(sum(s["wall_seconds"] for s in summaries), 2),
        }


def run_cell(
    cv: float,
    rate: float,
    seeds: Sequence[int],
    policies: Iterable[Policy] = POLICIES.values(),
    *,
    cluster: ClusterSpec | None = None,
    models: int = REFERENCE_MODELS,
    popularity_exponent: float = REFERENCE_POPULARITY,
    duration_s: float = REFERENCE_DURATION_S,
    config: SimConfig | None = None,
) -> dict[str, CellResult]:
    """Every policy on the same traces (common random numbers), one per seed."""
    cluster = cluster or reference_cluster()
    chosen = list(policies)
    cells = {p.name: CellResult(p.name, cv, rate) for p in chosen}
    for seed in seeds:
        workload = make_workload(
            models=models,
            rate=rate,
            cv=cv,
            duration_s=duration_s,
            seed=seed,
            popularity_exponent=popularity_exponent,
        )
        for policy in chosen:
            cells[policy.name].runs.append(simulate(policy, cluster, workload, config))
    return cells
