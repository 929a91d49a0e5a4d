"""SLO attainment of four serving policies on a simulated cluster (the paper's Fig. 9).

Runs the cluster simulator, with the real planner placing every cold start, for
CV in {2, 4, 8} x rate in {0.6, 0.7, 0.8} req/s under serverless vLLM, ServerlessLLM,
HydraServe and HydraServe + cache; then times ``plan()`` on a 1,000-node x 8-GPU cluster
and one simulated hour of 1,000 models on that cluster; and models larger than one GPU
(Llama-2-70B, tensor parallel on 4 GPUs, beside 13B) on 8 x 80 GB A100/H100 servers.
Then sweeps the engine-ready floor (4, 8, 15, 25 s) x the store bandwidth (32, 64, 128,
256 Gbps) at CV 2 / 0.6 req/s and publishes the HydraServe / serverless-vLLM ratio as a
band (min / median / max over the grid) with the full grid, twice: with the floor moving
every policy's engine start alike, and with only HydraServe's floor moving (the baselines
kept at their paper calibration: the worst case for HydraServe).
Prints tables and writes ``benchmarks/results/slo_attainment.json`` and ``.png``.

    python -m benchmarks.slo_attainment               # 5 seeds per cell, about 6 minutes
    python -m benchmarks.slo_attainment --seeds 2     # quicker, noisier
    python -m benchmarks.slo_attainment --large-only  # only the 70B section (updates the JSON)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info
from benchmarks.slo_attainment.band import band, point_label, ratio, spread
from hydraserve.logs import configure_logging, get_logger
from hydraserve.planner import (
    SLO,
    ClusterState,
    GPUState,
    InflightFetch,
    NodeState,
    PlanRequest,
    plan,
)
from hydraserve.sim.catalog import LLAMA2_7B, LLAMA2_13B
from hydraserve.sim.cluster import a100_h100_cluster, large_cluster, paper_testbed
from hydraserve.sim.experiment import (
    REFERENCE_MODELS,
    REFERENCE_POPULARITY,
    REFERENCE_STORE_GBPS,
    CellResult,
    run_cell,
)
from hydraserve.sim.policies import (
    HYDRASERVE,
    HYDRASERVE_CACHE,
    POLICIES,
    SERVERLESSLLM_SSD,
    Policy,
    with_engine_floor,
)
from hydraserve.sim.simulator import SimConfig, simulate
from hydraserve.sim.workload import make_workload

CVS = (2.0, 4.0, 8.0)
SWEEP_FLOORS_S = (4.0, 8.0, 15.0, 25.0)
SWEEP_STORE_GBPS: tuple[float | None, ...] = (32.0, 64.0, 128.0, 256.0)
RATES = (0.6, 0.7, 0.8)
TARGET_RATIO = 1.74
RESULTS = Path(__file__).resolve().parents[1] / "results"


def synthetic_cluster(nodes: int, gpus: int, rng: random.Random) -> ClusterState:
    """A busy 1,000-node cluster for timing plan(): mixed A10/V100 servers, GPUs half
    free, a quarter of nodes fetching (some low priority), 1 % caching the model."""
    states = []
    for i in range(nodes):
        v100 = i % 2 == 1
        total = int((32 if v100 else 24) * 1e9)
        gpu_states = tuple(
            GPUState(g, total, rng.choice((total, total // 2, int(total * rng.random()))))
            for g in range(gpus)
        )
        inflight = tuple(
            InflightFetch(int(rng.uniform(1e9, 10e9)), rng.uniform(2, 20), rng.random() < 0.3)
            for _ in range(rng.choice((0, 0, 0, 1, 2)))
        )
        cached = frozenset({"model-7b"}) if rng.random() < 0.01 else frozenset()
        states.append(
            NodeState(f"node-{i}", gpu_states, 2e9, "V100" if v100 else "A10", cached, inflight)
        )
    return ClusterState(tuple(states), store_bytes_per_s=400e9)


def time_plan(nodes: int = 1000, gpus: int = 8, calls: int = 400) -> dict[str, float]:
    rng = random.Random(0)
    cluster = synthetic_cluster(nodes, gpus, rng)
    profiles = [LLAMA2_7B.profile("model-7b", 250), LLAMA2_13B.profile("model-13b", 250)]
    requests = [
        PlanRequest(
            rng.choice(profiles),
            SLO(rng.choice((7.5, 12.0, 37.5, 60.0)), rng.choice((0.084, 0.116, 0.2))),
            waited_s=rng.choice((0.0, 0.0, 1.0, 3.0)),
        )
        for _ in range(calls)
    ]
    plan(requests[0], cluster)  # warm caches (imports, partitions)
    times = []
    for request in requests:
        # Best of 3 per request (timeit's practice): on a shared machine the slower runs
        # measure other processes, not plan().
        best = math.inf
        for _ in range(3):
            started = time.perf_counter()
            plan(request, cluster)
            best = min(best, time.perf_counter() - started)
        times.append(best * 1e3)
    times.sort()
    return {
        "median": statistics.median(times),
        "p90": times[int(0.9 * len(times))],
        "p99": times[int(0.99 * len(times))],
        "calls": float(calls),
    }


def time_scale_sim(models: int = 1000, nodes: int = 1000) -> dict[str, Any]:
    """One simulated hour of ``models`` models on ``nodes`` x 8 GPUs, at the reference
    setting's per-model request intensity."""
    rate = 0.6 * models / REFERENCE_MODELS
    cluster = large_cluster(nodes=nodes, store_gbps=REFERENCE_STORE_GBPS * nodes / 8)
    out: dict[str, Any] = {"models": models, "nodes": nodes, "gpus_per_node": 8, "rate": rate}
    workload = make_workload(models=models, rate=rate, cv=2.0, seed=0)
    for policy in (HYDRASERVE, HYDRASERVE_CACHE):
        started = time.perf_counter()
        result = simulate(policy, cluster, workload)
        wall = time.perf_counter() - started
        summary = result.summary()
        out[policy.name] = {
            "wall_seconds": round(wall, 2),
            "requests": summary["requests"],
            "cold_starts": summary["cold_starts"],
            "ttft_attainment": round(summary["ttft_attainment"], 4),
            "plan_calls": summary["plan_calls"],
            "plan_ms_mean": round(summary["plan_ms_mean"], 3),
        }
    out["wall_seconds_max"] = max(
        out[p.name]["wall_seconds"] for p in (HYDRASERVE, HYDRASERVE_CACHE)
    )
    return out


LARGE_NIC_GBPS = 25.0
LARGE_STORE_GBPS = 200.0
LARGE_MODELS = 48
LARGE_RATES = (0.3, 0.6)


def large_models(seeds: list[int]) -> dict[str, Any]:
    """Models larger than one GPU: Llama-2-70B (tp 4: 138 GB over 4 x 80 GB GPUs) beside
    13B (tp 1), on 4 A100 + 4 H100 servers of 8 x 80 GB whose nodes each read the store at
    25 Gbps (200 Gbps in all); 48 models, CV 2, one hour. The 70B TTFT SLO is 30 s: one
    NIC fetches 138 GB in ~44 s, so HydraServe meets it with tp 4 inside a node x pp
    across nodes, each node fetching its stage once for its 4 ranks."""
    cluster = a100_h100_cluster(nic_gbps=LARGE_NIC_GBPS, store_gbps=LARGE_STORE_GBPS)
    cells: list[dict[str, Any]] = []
    for rate in LARGE_RATES:
        runs: dict[str, list[Any]] = {name: [] for name in POLICIES}
        for seed in seeds:
            workload = make_workload(
                models=LARGE_MODELS, rate=rate, cv=2.0, seed=seed, sizes=("13b", "70b")
            )
            for policy in POLICIES.values():
                runs[policy.name].append(simulate(policy, cluster, workload))
        for name, results in runs.items():
            summaries = [r.summary() for r in results]
            by_size: dict[str, list[bool]] = {}
            for r in results:
                for req in r.requests:
                    by_size.setdefault(req.size, []).append(req.ttft_s <= req.ttft_slo_s)
            shapes: dict[str, int] = {}
            for s in summaries:
                for shape, n in s["pp_x_tp_histogram"].items():
                    shapes[shape] = shapes.get(shape, 0) + n
            requests = sum(s["requests"] for s in summaries)
            cold = sum(s["cold_starts"] for s in summaries)
            cells.append(
                {
                    "policy": name,
                    "rate": rate,
                    "cv": 2.0,
                    "seeds": len(seeds),
                    "requests": requests,
                    "ttft_attainment": round(
                        sum(s["ttft_attainment"] * s["requests"] for s in summaries) / requests, 4
                    ),
                    "tpot_attainment": round(
                        sum(s["tpot_attainment"] * s["requests"] for s in summaries) / requests, 4
                    ),
                    "ttft_attainment_by_size": {
                        size: round(sum(ok) / len(ok), 4) for size, ok in sorted(by_size.items())
                    },
                    "cold_starts": cold,
                    "cold_start_mean_s": round(
                        sum(s["cold_start_mean_s"] * s["cold_starts"] for s in summaries) / cold, 2
                    )
                    if cold
                    else 0.0,
                    "pp_x_tp_histogram": dict(sorted(shapes.items())),
                    "no_consolidation_target": sum(s["no_consolidation_target"] for s in summaries),
                }
            )
    return {
        "setting": {
            "cluster": "4 x (8 A100 80 GB) + 4 x (8 H100 80 GB) servers, "
            f"{LARGE_NIC_GBPS:g} Gbps per node to the store, {LARGE_STORE_GBPS:g} Gbps in all",
            "models": LARGE_MODELS,
            "model_classes": "Llama-2-13B (26.0 GB, tp 1) and Llama-2-70B (138.0 GB, tp 4), "
            "KV 5 / 20 GB; 70B TTFT SLO 30 s (x5 summarization), TPOT 200 / 60 ms",
            "duration_s": 3600,
            "seeds": seeds,
        },
        "table": cells,
    }


def print_large(large: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        "rate", "policy", "TTFT", "13B", "70B", "TPOT", "cold starts (pp x tp)",
        title="Models larger than one GPU: 70B tp 4 + 13B on 8 x 80 GB servers, CV 2",
    )  # fmt: skip
    for c in large["table"]:
        sizes = c["ttft_attainment_by_size"]
        table.add_row(
            f"{c['rate']}", c["policy"], f"{c['ttft_attainment']:.1%}",
            f"{sizes.get('13b', 0):.1%}", f"{sizes.get('70b', 0):.1%}",
            f"{c['tpot_attainment']:.1%}",
            ", ".join(f"{k}: {v}" for k, v in c["pp_x_tp_histogram"].items()),
        )  # fmt: skip
    Console(width=160).print(table)


def sensitivity_sweep(seeds: list[int]) -> list[dict[str, Any]]:
    """TTFT attainment at CV 2 / 0.6 req/s as the two calibrated knobs move."""
    rows = []
    for store_gbps, exponent in (
        (32.0, REFERENCE_POPULARITY), (64.0, REFERENCE_POPULARITY), (128.0, REFERENCE_POPULARITY),
        (None, REFERENCE_POPULARITY), (64.0, 0.6), (64.0, 1.0), (64.0, 1.2),
    ):  # fmt: skip
        cells = run_cell(
            2.0, 0.6, seeds, cluster=paper_testbed(store_gbps=store_gbps),
            popularity_exponent=exponent,
        )  # fmt: skip
        row: dict[str, Any] = {"store_gbps": store_gbps, "popularity_exponent": exponent}
        row.update({name: round(cell.ttft_attainment, 4) for name, cell in cells.items()})
        row["ratio_hydraserve_vs_serverless_vllm"] = round(
            cells["hydraserve"].ttft_attainment / cells["serverless-vllm"].ttft_attainment, 3
        )
        rows.append(row)
    return rows


def floor_store_sweep(seeds: list[int], scope: str) -> dict[str, Any]:
    """TTFT attainment at CV 2 / 0.6 req/s over engine-ready floor x store bandwidth.

    ``scope`` "all": the floor moves every policy's engine start alike
    (:func:`with_engine_floor`); "hydraserve": only HydraServe's, the baselines keep the
    paper's calibration (4 s-floor hardware)."""
    log = get_logger("bench.slo_attainment")
    grid: list[dict[str, Any]] = []
    ratios: dict[str, float] = {}
    cache_ratios: dict[str, float] = {}
    for floor_s in SWEEP_FLOORS_S:
        for store_gbps in SWEEP_STORE_GBPS:
            policies: list[Policy] = [
                with_engine_floor(p, floor_s)
                if scope == "all" or p.name.startswith("hydraserve")
                else p
                for p in POLICIES.values()
            ]
            cells = run_cell(
                2.0, 0.6, seeds, policies, cluster=paper_testbed(store_gbps=store_gbps)
            )
            label = point_label(floor_s, store_gbps)
            hs, base = cells["hydraserve"], cells["serverless-vllm"]
            per_seed = [
                ratio(a.ttft_attainment, b.ttft_attainment)
                for a, b in zip(hs.runs, base.runs, strict=True)
            ]
            ratios[label] = ratio(hs.ttft_attainment, base.ttft_attainment)
            cache_ratios[label] = ratio(
                cells["hydraserve+cache"].ttft_attainment, base.ttft_attainment
            )
            row: dict[str, Any] = {"floor_s": floor_s, "store_gbps": store_gbps}
            row.update({name: round(cell.ttft_attainment, 4) for name, cell in cells.items()})
            row["ratio_hydraserve_vs_serverless_vllm"] = round(ratios[label], 3)
            row["ratio_per_seed"] = {k: round(v, 3) for k, v in spread(per_seed).items()}
            row["ratio_hydraserve_cache_vs_serverless_vllm"] = round(cache_ratios[label], 3)
            row["hydraserve_cold_start_mean_s"] = hs.as_dict()["cold_start_mean_s"]
            row["serverless_vllm_cold_start_mean_s"] = base.as_dict()["cold_start_mean_s"]
            grid.append(row)
            log.info("sweep.point", scope=scope, point=label, ratio=round(ratios[label], 3))
    return {
        "scope": scope,
        "cv": 2.0,
        "rate": 0.6,
        "seeds": seeds,
        "floors_s": list(SWEEP_FLOORS_S),
        "store_gbps": list(SWEEP_STORE_GBPS),
        "band_hydraserve_vs_serverless_vllm": band(ratios).as_dict(),
        "band_hydraserve_cache_vs_serverless_vllm": band(cache_ratios).as_dict(),
        "grid": grid,
    }


def consolidation_models(seeds: list[int]) -> dict[str, Any]:
    """HydraServe at the reference cell with the implemented consolidation vs the paper's
    in-place takeover (what the previous version of this benchmark simulated)."""
    out: dict[str, Any] = {}
    for model in ("implemented", "paper"):
        cells = run_cell(2.0, 0.6, seeds, [HYDRASERVE], config=SimConfig(consolidation_model=model))
        cell = cells["hydraserve"].as_dict()
        out[model] = {
            k: cell[k] for k in ("ttft_attainment", "tpot_attainment", "cost_gb_s_per_request")
        }
    return out


def print_sweep(sweep: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    b = sweep["band_hydraserve_vs_serverless_vllm"]
    scope = {
        "all": "floor moves every policy's engine start",
        "hydraserve": "only HydraServe's floor moves",
    }[sweep["scope"]]
    table = Table(
        "floor", "store", *POLICIES, "HS / vLLM (per-seed min-max)",
        title=f"CV 2 / 0.6 req/s, {scope}: TTFT-SLO attainment over floor x store bandwidth",
    )  # fmt: skip
    for row in sweep["grid"]:
        per_seed = row["ratio_per_seed"]
        store = "unlimited" if row["store_gbps"] is None else f"{row['store_gbps']:g} Gbps"
        table.add_row(
            f"{row['floor_s']:g} s", store, *(f"{row[p]:.1%}" for p in POLICIES),
            f"{row['ratio_hydraserve_vs_serverless_vllm']:.2f}x "
            f"({per_seed['min']:.2f}-{per_seed['max']:.2f})",
        )  # fmt: skip
    Console(width=160).print(table)
    print(
        f"band HydraServe / serverless vLLM ({scope}): min {b['min']:.2f}x ({b['argmin']}), "
        f"median {b['median']:.2f}x, max {b['max']:.2f}x ({b['argmax']}) over {b['points']} points"
    )


def plot(cells: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = list(POLICIES)
    colors = ["#9e9e9e", "#7aa6c2", "#e07b39", "#b5452a"]
    fig, axes = plt.subplots(2, len(CVS), figsize=(13, 6.5), sharey="row")
    width = 0.2
    for col, cv in enumerate(CVS):
        for row, (key, label) in enumerate(
            (
                ("ttft_attainment", "TTFT SLO attainment"),
                ("cost_gb_s_per_request", "GB·s / request"),
            )
        ):
            ax = axes[row][col]
            for i, policy in enumerate(policies):
                values = [
                    next(
                        c[key]
                        for c in cells
                        if c["policy"] == policy and c["cv"] == cv and c["rate"] == rate
                    )
                    for rate in RATES
                ]
                xs = [x + (i - 1.5) * width for x in range(len(RATES))]
                ax.bar(xs, values, width, label=policy, color=colors[i])
            ax.set_xticks(range(len(RATES)), [f"{r} req/s" for r in RATES])
            if row == 0:
                ax.set_title(f"CV = {cv:g}")
                ax.set_ylim(0, 1.05)
            if col == 0:
                ax.set_ylabel(label)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(policies), frameon=False)
    fig.suptitle("Simulated SLO attainment and cost, paper-like testbed (384 models, 1 h)")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(cells: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    policies = list(POLICIES)
    table = Table(
        "CV", "rate", *(f"{p}\nTTFT / TPOT / GB·s" for p in policies), "HS / sLLM-vLLM",
        title="TTFT-SLO attainment, TPOT-SLO attainment, cost per request (pooled over seeds)",
    )  # fmt: skip
    for cv in CVS:
        for rate in RATES:
            row = {c["policy"]: c for c in cells if c["cv"] == cv and c["rate"] == rate}
            ratio = row["hydraserve"]["ttft_attainment"] / row["serverless-vllm"]["ttft_attainment"]
            table.add_row(
                f"{cv:g}", f"{rate}",
                *(
                    f"{row[p]['ttft_attainment']:.1%} / {row[p]['tpot_attainment']:.0%} / "
                    f"{row[p]['cost_gb_s_per_request']:.0f}"
                    for p in policies
                ),
                f"{ratio:.2f}x",
            )  # fmt: skip
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="traces per cell (pooled)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--skip-scale", action="store_true", help="skip the 1,000-node runs")
    parser.add_argument(
        "--sweep-seeds", type=int, default=3, help="traces per point of the floor x store sweep"
    )
    parser.add_argument(
        "--large-only",
        action="store_true",
        help="run only the 70B (tensor parallel) section and update it in the existing JSON",
    )
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="also sweep store bandwidth and popularity skew at CV 2 / 0.6 req/s",
    )
    args = parser.parse_args(argv)
    configure_logging("INFO")  # progress per cell on stderr; the simulator logs at debug
    log = get_logger("bench.slo_attainment")
    started = time.perf_counter()
    seeds = list(range(args.seeds))
    if args.large_only:
        large = large_models(seeds)
        path = args.out / "slo_attainment.json"
        saved = json.loads(path.read_text()) if path.exists() else {"benchmark": "slo_attainment"}
        saved["large_models"] = large
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(saved, indent=2) + "\n")
        print_large(large)
        print(f"updated large_models in {path}")
        return 0
    cells: list[dict[str, Any]] = []
    grid: dict[tuple[float, float], dict[str, CellResult]] = {}
    for cv in CVS:
        for rate in RATES:
            grid[(cv, rate)] = run_cell(cv, rate, seeds)
            cells += [c.as_dict() for c in grid[(cv, rate)].values()]
            log.info(
                "cell.done", cv=cv, rate=rate, elapsed_s=round(time.perf_counter() - started, 1)
            )

    def attain(cv: float, rate: float, policy: str) -> float:
        return grid[(cv, rate)][policy].ttft_attainment

    ratios = {
        f"cv{cv:g}_r{rate}": round(
            attain(cv, rate, "hydraserve") / attain(cv, rate, "serverless-vllm"), 3
        )
        for cv in CVS
        for rate in RATES
    }
    cache_margin = {
        f"cv{cv:g}_r{rate}": round(
            attain(cv, rate, "hydraserve+cache") - attain(cv, rate, "hydraserve"), 4
        )
        for cv in CVS
        for rate in RATES
    }
    sensitivity = sensitivity_sweep(seeds[:3]) if args.sensitivity else None
    sweep_seeds = seeds[: args.sweep_seeds]
    sweeps = [floor_store_sweep(sweep_seeds, scope) for scope in ("all", "hydraserve")]
    consolidation = consolidation_models(seeds)
    plan_ms = time_plan()
    scale = None if args.skip_scale else time_scale_sim()
    per_seed_ratio = [
        round(a.ttft_attainment / b.ttft_attainment, 3)
        for a, b in zip(
            grid[(2.0, 0.6)]["hydraserve"].runs,
            grid[(2.0, 0.6)]["serverless-vllm"].runs,
            strict=True,
        )
    ]
    results: dict[str, Any] = {
        "benchmark": "slo_attainment",
        "machine": machine_info(),
        "setting": {
            "cluster": "4 x (4 A10 24 GB) + 4 x (4 V100 32 GB) servers, 16 Gbps NICs, "
            f"model store {REFERENCE_STORE_GBPS:g} Gbps in all (2 storage servers x 32 Gbps)",
            "models": REFERENCE_MODELS,
            "model_classes": "Llama-2-7B (13.5 GB) and 13B (26.0 GB) shapes, 5 GB KV each",
            "applications": "chatbot, code, summarization (64 models per app x size)",
            "popularity_zipf_exponent": REFERENCE_POPULARITY,
            "duration_s": 3600,
            "keep_alive_s": 30,
            "seeds": seeds,
            "consolidation": "as implemented (control/consolidation.py, decision 0402): "
            "fetch the rest + start a standalone engine at the pipeline's Ready, promote "
            "when both are done, release the whole pipeline",
            "serverlessllm_tiers": "host memory 12 GB/s (128 GB per server) + SSD "
            f"{SERVERLESSLLM_SSD.load_bytes_per_s / 1e9:g} GB/s "
            f"({SERVERLESSLLM_SSD.capacity_bytes / 1e12:g} TB per server); assumed, see README",
        },
        "band_hydraserve_vs_serverless_vllm": sweeps[0]["band_hydraserve_vs_serverless_vllm"],
        "band_hydraserve_vs_serverless_vllm_hydraserve_floor_only": sweeps[1][
            "band_hydraserve_vs_serverless_vllm"
        ],
        "sweep_floor_x_store": sweeps[0],
        "sweep_floor_x_store_hydraserve_floor_only": sweeps[1],
        "consolidation_implemented_vs_paper_cv2_r0.6": consolidation,
        "ratio_hydraserve_vs_serverless_vllm_cv2_r0.6": ratios["cv2_r0.6"],
        "ratio_hydraserve_vs_serverless_vllm_cv2_r0.6_per_seed": per_seed_ratio,
        "target_ratio": TARGET_RATIO,
        "ratio_hydraserve_vs_serverless_vllm": ratios,
        "hydraserve_cache_minus_hydraserve": cache_margin,
        "hydraserve_cache_ge_hydraserve_everywhere": all(v >= 0 for v in cache_margin.values()),
        "plan_ms_median_1000_nodes": round(plan_ms["median"], 3),
        "plan_ms_1000_nodes": {k: round(v, 3) for k, v in plan_ms.items()},
        "sim_seconds_1h_1000_models": scale["wall_seconds_max"] if scale else None,
        "scale_run": scale,
        "table": cells,
        "sensitivity_cv2_r0.6": sensitivity,
        "large_models": large_models(seeds),
        "benchmark_wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "slo_attainment.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(cells, args.out / "slo_attainment.png")
    print_table(cells)
    print_large(results["large_models"])
    for sweep in sweeps:
        print_sweep(sweep)
    print(
        "consolidation at CV 2 / 0.6 (HydraServe), implemented vs paper's takeover: "
        + ", ".join(
            f"{m}: TTFT {v['ttft_attainment']:.1%}, TPOT {v['tpot_attainment']:.1%}, "
            f"{v['cost_gb_s_per_request']:.0f} GB·s/request"
            for m, v in consolidation.items()
        )
    )
    print(
        f"HydraServe / serverless vLLM at CV 2, 0.6 req/s: {ratios['cv2_r0.6']:.2f}x "
        f"(target >= {TARGET_RATIO}); per seed {per_seed_ratio}"
    )
    cache_ok = results["hydraserve_cache_ge_hydraserve_everywhere"]
    print(f"HydraServe + cache >= HydraServe everywhere: {cache_ok}")
    print(
        f"plan() on 1,000 nodes x 8 GPUs: median {plan_ms['median']:.2f} ms, "
        f"p99 {plan_ms['p99']:.2f} ms"
    )
    if scale:
        print(
            f"one simulated hour, 1,000 models on 1,000 x 8 GPUs: {scale['wall_seconds_max']:.1f} s"
        )
    print(f"wrote {args.out / 'slo_attainment.json'} and {args.out / 'slo_attainment.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
