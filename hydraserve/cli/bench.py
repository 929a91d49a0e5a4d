"""``hydraserve bench``: benchmarks and the cluster simulator."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(help="Benchmarks and the cluster simulator.", no_args_is_help=True)


@app.command("sim")
def sim(
    policy: list[str] = typer.Option(
        [],
        "--policy",
        "-p",
        help="Policy to run (repeatable): serverless-vllm, serverlessllm, hydraserve, "
        "hydraserve+cache. Default: all four.",
    ),
    cv: float = typer.Option(2.0, help="Coefficient of variation of each model's arrivals."),
    rate: float = typer.Option(0.6, help="Requests per second over all models."),
    models: int = typer.Option(384, help="Models (split over 3 applications x 7B/13B)."),
    duration: float = typer.Option(3600.0, help="Simulated seconds of arrivals."),
    seed: list[int] = typer.Option([0], "--seed", help="Trace seed (repeatable; pooled)."),
    cluster: str = typer.Option(
        "paper", help="paper (8 servers x 4 GPUs, like the paper's testbed) or large."
    ),
    nodes: int = typer.Option(1000, help="Servers of the large cluster."),
    store_gbps: float = typer.Option(
        64.0, help="Model-store bandwidth in Gbps for 8 servers (scaled with --nodes)."
    ),
    popularity: float = typer.Option(0.8, help="Zipf exponent of model popularity."),
    json_out: Path | None = typer.Option(None, "--json", help="Also write results here."),
) -> None:
    """Simulate a cluster under each serving policy; print SLO attainment and cost.

    Replays a Gamma-arrival trace, with the real planner placing every cold start.
    """
    from rich.console import Console
    from rich.table import Table

    from hydraserve.cli.common import console, setup_logging
    from hydraserve.sim.cluster import large_cluster, paper_testbed
    from hydraserve.sim.experiment import run_cell
    from hydraserve.sim.policies import POLICIES

    setup_logging()
    unknown = [p for p in policy if p not in POLICIES]
    if unknown:
        raise typer.BadParameter(
            f"unknown policy {', '.join(unknown)}; choose from {', '.join(POLICIES)}",
            param_hint="--policy",
        )
    if cluster == "paper":
        spec = paper_testbed(store_gbps=store_gbps)
    elif cluster == "large":
        spec = large_cluster(nodes=nodes, store_gbps=store_gbps * nodes / 8)
    else:
        raise typer.BadParameter("choose paper or large", param_hint="--cluster")
    chosen = [POLICIES[p] for p in policy] if policy else list(POLICIES.values())
    with console.status(f"simulating {len(chosen)} policies x {len(seed)} seeds"):
        cells = run_cell(
            cv, rate, seed, chosen, cluster=spec, models=models,
            popularity_exponent=popularity, duration_s=duration,
        )  # fmt: skip
    table = Table(title=f"{spec.name}: {models} models, CV {cv}, {rate} req/s, {duration:.0f} s")
    table.add_column("policy", no_wrap=True)
    for header in ("TTFT ok", "TPOT ok", "GB·s/req", "requests", "cold", "cold s", "pp", "wall s"):
        table.add_column(header, justify="right")
    rows = []
    for cell in cells.values():
        row = cell.as_dict()
        rows.append(row)
        table.add_row(
            cell.policy, f"{row['ttft_attainment']:.1%}", f"{row['tpot_attainment']:.1%}",
            f"{row['cost_gb_s_per_request']:.0f}", str(row["requests"]),
            str(row["cold_starts"]), f"{row['cold_start_mean_s']:.1f}",
            " ".join(f"{k}:{v}" for k, v in row["pp_histogram"].items()),
            f"{row['sim_wall_seconds']:.1f}",
        )  # fmt: skip
    # Results to stdout (progress and logs go to stderr); piped output gets a wide table.
    out = Console() if sys.stdout.isatty() else Console(width=120)
    out.print(table)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"cluster": spec.name, "cells": rows}, indent=2) + "\n")
        console.print(f"results written to {json_out}")


@app.command("replay")
def replay_history(
    state: Path = typer.Argument(
        ...,
        help="A calibration state: <state_dir>/planner-calibration.json, or the "
        "state.json key of the hydraserve-planner-calibration ConfigMap saved to a file.",
    ),
    planner: str = typer.Option(
        "{}", help="The configured PlannerConfig (JSON), as HYDRASERVE_*_PLANNER sets it."
    ),
    output: Path | None = typer.Option(None, help="Also write the rows as JSON here."),
) -> None:
    """Plan the recorded cold starts again: with the configured constants and with the
    calibrated ones, beside what was chosen and measured."""
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from hydraserve.planner import PlannerConfig
    from hydraserve.planner.calibration import CalibrationSettings, CalibrationState, Calibrator
    from hydraserve.sim.replay import replay

    saved = CalibrationState.model_validate_json(state.read_text())
    base = PlannerConfig.model_validate_json(planner)
    calibrated = Calibrator(CalibrationSettings(), saved).config(base)
    rows = replay(saved.history, base, calibrated)
    table = Table(
        title=f"{len(rows)} recorded cold starts; calibrated: {saved.fitted or 'nothing'}"
    )
    for column in ("instance", "pp then", "measured s", "pp configured", "predicted s",
                   "pp calibrated", "predicted s "):  # fmt: skip
        table.add_column(column)

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}"

    for r in rows:
        table.add_row(
            r.instance, str(r.recorded_pp), fmt(r.measured_ready_s),
            str(r.base_pp or "unschedulable"), fmt(r.base_ready_s),
            str(r.calibrated_pp or "unschedulable"), fmt(r.calibrated_ready_s),
        )  # fmt: skip
    Console().print(table)
    if output is not None:
        output.write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")
