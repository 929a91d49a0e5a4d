"""The planner's cost model: predicted cold TTFT, TPOT and per-worker memory. Pure.

Kept apart from the search in :mod:`hydraserve.planner.search` so the simulator and
the fidelity check use the very same formulas (see ``docs/decisions/0100-planner-cost-model.md``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hydraserve.planner.config import PlannerConfig
from hydraserve.planner.types import InflightFetch, ModelProfile, NodeState


@dataclass(frozen=True)
class StageShape:
    """What the speed of one pipeline stage depends on."""

    layers: int
    memory_bytes: int  # GPU memory the worker holds (its compute share when GPUs are shared)
    gpu_type: str
    tp: int = 1  # GPUs of one node the stage runs on (tensor parallel)


def lookup_speed(table: dict[str, float], gpu_type: str, default: float) -> float:
    """Profiled seconds for a GPU type; unknown types get the slowest profiled one."""
    if gpu_type in table:
        return table[gpu_type]
    return max(table.values()) if table else default


def part_card_memory_bytes(model: ModelProfile, pp: int, rank: int) -> int:
    """A part-card worker holds its stage's weights plus its share of the KV cache."""
    return model.partitions[pp][rank][2] + math.ceil(model.kv_bytes / pp)


def tensor_parallel_speedup(tp: int, efficiency: float) -> float:
    """How much faster a stage runs on ``tp`` GPUs of one node than on one (``PlannerConfig.
    tensor_parallel_efficiency``: what each further GPU adds, net of the all-reduces)."""
    return 1.0 + (max(1, tp) - 1) * efficiency


def pipeline_slowdown(
    model: ModelProfile,
    stages: Sequence[StageShape],
    table: dict[str, float],
    default: float,
    tp_efficiency: float = 1.0,
) -> float:
    """Seconds of one pass through the pipeline, from per-GPU-type single-GPU seconds.

    A stage runs its share of the layers; when GPU compute is shared in proportion to
    memory, a worker holding less than a whole replica's memory gets proportionally less
    compute (so a part-card stage with 1/pp of the layers and 1/pp of the memory takes as
    long as the whole model on a whole replica's share). A stage on ``tp`` GPUs is
    :func:`tensor_parallel_speedup` times faster (its memory is the total over its GPUs).
    """
    num_layers = max(1, model.num_layers)
    total = 0.0
    for stage in stages:
        base = lookup_speed(table, stage.gpu_type, default)
        compute_ratio = max(1.0, model.replica_bytes / max(1, stage.memory_bytes))
        speedup = tensor_parallel_speedup(stage.tp, tp_efficiency)
        total += base * (stage.layers / num_layers) * compute_ratio / speedup
    return total


def predict_tpot_s(
    model: ModelProfile, stages: Sequence[StageShape], config: PlannerConfig
) -> float:
    shapes = stages if config.compute_share_follows_memory else _unshared(model, stages)
    pass_s = pipeline_slowdown(
        model, shapes, model.tpot_s, config.default_tpot_s, config.tensor_parallel_efficiency
    )
    return pass_s + config.stage_hop_s * (len(stages) - 1)


def predict_prefill_s(
    model: ModelProfile, stages: Sequence[StageShape], config: PlannerConfig
) -> float:
    shapes = stages if config.compute_share_follows_memory else _unshared(model, stages)
    return pipeline_slowdown(
        model, shapes, model.prefill_s, config.default_prefill_s, config.tensor_parallel_efficiency
    )


def _unshared(model: ModelProfile, stages: Sequence[StageShape]) -> list[StageShape]:
    return [StageShape(s.layers, model.replica_bytes, s.gpu_type, s.tp) for s in stages]


@dataclass(frozen=True)
class TTFTEstimate:
    ttft_s: float
    terms: dict[str, float]


def predict_ttft(
    *,
    waited_s: float,
    fetch_s: float,
    max_stage_bytes: int,
    prefill_s: float,
    config: PlannerConfig,
    floor_s: float | None = None,
) -> TTFTEstimate:
    """Cold TTFT of a plan whose slowest stage fetch takes ``fetch_s`` seconds
    (``floor_s``: the engine-ready floor of its nodes; default: the config's).
    ``max_stage_bytes`` is what one GPU loads of the biggest stage (its 1/tp share)."""
    floor = config.engine_ready_floor_s if floor_s is None else floor_s
    fetch_done = config.fetch_start_delay_s + fetch_s
    serial_load = (
        max_stage_bytes / config.serial_load_bytes_per_s if config.serial_load_bytes_per_s else 0.0
    )
    startup = max(floor, fetch_done)
    ttft = waited_s + startup + serial_load + config.post_fetch_s + prefill_s
    return TTFTEstimate(
        ttft,
        {
            "waited_s": waited_s,
            "fetch_s": fetch_s,
            "fetch_start_delay_s": config.fetch_start_delay_s,
            "engine_ready_floor_s": floor,
            "startup_s": startup,
            "serial_load_s": serial_load,
            "post_fetch_s": config.post_fetch_s,
            "prefill_s": prefill_s,
        },
    )


def fetch_budget_s(
    slo_ttft_s: float, waited_s: float, max_stage_bytes: int, prefill_s: float,
    config: PlannerConfig,
) -> float:  # fmt: skip
    """Longest the slowest stage's fetch may take for the TTFT SLO to hold."""
    serial_load = (
        max_stage_bytes / config.serial_load_bytes_per_s if config.serial_load_bytes_per_s else 0.0
    )
    return (
        slo_ttft_s
        - waited_s
        - serial_load
        - config.post_fetch_s
        - prefill_s
        - config.fetch_start_delay_s
    )


def cold_ttft_s(
    *,
    link_bytes_per_s: float,
    model_bytes: int,
    pp: int,
    engine_ready_floor_s: float,
    prefill_s: float = 0.0,
    config: PlannerConfig | None = None,
) -> float:
    """Cold TTFT on an idle cluster: ``pp`` equal stages, each over its own link.

    The closed form the planner uses, for checking against the data-plane benchmark:
    give it the link rate, the model's bytes, pp and the measured engine-ready floor.
    """
    cfg = (config or PlannerConfig()).model_copy(
        update={"engine_ready_floor_s": engine_ready_floor_s}
    )
    stage_bytes = math.ceil(model_bytes / pp)
    fetch_s = stage_bytes / (link_bytes_per_s * cfg.fetch_efficiency)
    return predict_ttft(
        waited_s=0.0,
        fetch_s=fetch_s,
        max_stage_bytes=stage_bytes,
        prefill_s=prefill_s,
        config=cfg,
    ).ttft_s


def admitted_share(node: NodeState, config: PlannerConfig) -> float:
    """Rate a new fetch would get at ``node`` under fair sharing; 0.0 if not admitted.

    In-flight low-priority (consolidation) fetches yield, so they neither take a share
    nor are protected. A high-priority fetch that meets its deadline at today's share
    must still meet it at the share left after admitting one more fetch; one that is
    already late even today is not protected (it is lost either way) but still shares.
    """
    line_rate = node.nic_bytes_per_s * config.fetch_efficiency
    active: list[InflightFetch] = [f for f in node.inflight if not f.low_priority]
    if not active:
        return line_rate
    current = line_rate / len(active)
    share = line_rate / (len(active) + 1)
    if config.network_admission:
        for fetch in active:
            meets_now = fetch.bytes_left <= current * fetch.deadline_s
            if meets_now and fetch.bytes_left > share * fetch.deadline_s:
                return 0.0
    return share


def salvageable_wait_s(
    waits_s: Sequence[float], slo_ttft_s: float, config: PlannerConfig
) -> float | None:
    """The wait to plan a cold start for: that of the oldest queued request that a cold
    start could still serve within its TTFT SLO.

    A request that has waited longer than the SLO minus the fastest possible cold start
    (engine floor + post-fetch) is lost whatever the plan, so sizing the pipeline for it
    would only pick the pp = 1 fallback for everyone queued behind it and everyone who
    arrives while the instance starts. None when nothing queued is salvageable (then plan
    for a fresh arrival: ``waited_s=0``).
    """
    fastest = config.engine_ready_floor_s + config.post_fetch_s
    salvageable = [w for w in waits_s if w < slo_ttft_s - fastest]
    return max(salvageable) if salvageable else None
