"""The simulator's cold-start model, isolated, for checking it against measurements.

``simulated_cold_ttft`` runs the full simulator on a cluster of ``pp`` idle nodes joined
by links of a given rate, for one request to a model of a given size cut into ``pp``
equal stages. With the cost-model constants measured by the data-plane cold-start
benchmark (engine-ready floor, post-fetch time, fetch efficiency), its answer is what the
fidelity criterion compares with the measured cold TTFT (within 20 %).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from hydraserve.planner import SLO, ModelProfile, PlannerConfig
from hydraserve.sim.cluster import ClusterSpec, NodeSpec
from hydraserve.sim.policies import HYDRASERVE, Policy
from hydraserve.sim.simulator import SimConfig, simulate
from hydraserve.sim.workload import Arrival, ModelSpec, Workload

_LAYERS = 32  # enough for any pp <= 4; the cut is even, so only the byte count matters


def simulated_cold_ttft(
    *,
    link_bytes_per_s: float,
    model_bytes: int,
    pp: int,
    engine_ready_floor_s: float,
    models: int = 1,
    post_fetch_s: float | None = None,
    prefill_s: float = 0.0,
    store_bytes_per_s: float | None = None,
    config: PlannerConfig | None = None,
    policy: Policy = HYDRASERVE,
    stage_bytes: Sequence[int] | None = None,
) -> float:
    """Cold TTFT (seconds) the simulator predicts on an idle cluster of ``pp`` nodes.

    ``link_bytes_per_s`` is each node's link to the store, ``engine_ready_floor_s`` the
    measured time to an engine that could serve had every byte been local, and
    ``post_fetch_s`` (default: the policy's) the time from the last byte to ready.
    ``config`` overrides the policy's planner constants wholesale. ``stage_bytes``: each
    stage's bytes where the cut is not even (default: ``model_bytes`` split evenly).
    ``models`` > 1: that many models of this size requested at once (the contended case),
    each cut into the same stages on the same nodes, so their fetches share every node's
    link; the slowest one's TTFT.
    """
    if not 1 <= pp <= 4:
        raise ValueError("pp must be 1..4")
    base = config or policy.planner
    update: dict[str, object] = {"engine_ready_floor_s": engine_ready_floor_s, "max_pp": pp}
    if post_fetch_s is not None:
        update["post_fetch_s"] = post_fetch_s
    planner = base.model_copy(update=update)
    cuts = [round(i * _LAYERS / pp) for i in range(pp + 1)]
    if stage_bytes is None:
        per_layer, extra = divmod(model_bytes, _LAYERS)
        layer_bytes = [per_layer + (1 if i < extra else 0) for i in range(_LAYERS)]
        stage_bytes = [sum(layer_bytes[cuts[r] : cuts[r + 1]]) for r in range(pp)]
    if len(stage_bytes) != pp:
        raise ValueError(f"{len(stage_bytes)} stage sizes for pp={pp}")
    stages = tuple((cuts[r], cuts[r + 1], int(stage_bytes[r])) for r in range(pp))
    profile = ModelProfile(
        key="fidelity",
        total_bytes=model_bytes,
        replica_bytes=model_bytes,
        partitions={pp: stages},  # only this pp can be planned
        prefill_s={"probe": prefill_s},
        tpot_s={"probe": 0.01},
    )
    specs = tuple(
        ModelSpec(
            index, f"fidelity-{index}", "probe", "probe", SLO(ttft_s=math.inf, tpot_s=math.inf),
            dataclasses.replace(profile, key=f"fidelity-{index}"), {"probe": prefill_s},
        )
        for index in range(models)
    )  # fmt: skip
    nodes = tuple(
        NodeSpec(f"node-{i}", "probe", models, 2 * model_bytes, link_bytes_per_s, 0)
        for i in range(pp)
    )
    cluster = ClusterSpec("fidelity", nodes, store_bytes_per_s)
    arrivals = tuple(Arrival(0.0, index, 1, 2) for index in range(models))
    workload = Workload(specs, arrivals, 1.0, 0.0, 1.0, 0)
    chosen = Policy(policy.name, planner, consolidate=False, host_cache=False)
    result = simulate(chosen, cluster, workload, SimConfig(drain_s=3600.0))
    return max(request.ttft_s for request in result.requests)
