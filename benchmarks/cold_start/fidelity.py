"""Simulator fidelity: calibrated at one link rate, checked at the others.

The simulator's cold-start model takes, per pipeline size, the engine-ready floor measured
in the same run (all bytes local) and each stage's bytes; two constants are fitted from the
HydraServe runs at the calibration rate alone:

* ``fetch_efficiency``: nominal fetch time (stage bytes over the link rate) / measured
  fetch time (the prefetcher's start to last byte verified), median over every stage;
* ``post_fetch_s``: first token minus the last stage's last byte, median over the runs the
  fetch bounded (the floor ended earlier).

With these, the simulator predicts HydraServe's cold TTFT at every other rate, and in the
contended case (two models cold-starting at once as pp 2 pipelines on the same nodes, run
with ``--contended``); the error there is what says whether the model predicts (criterion:
within 20 %).
``python -m benchmarks.cold_start.fidelity [--calibrate-at RATE]`` recomputes it from
``benchmarks/results/cold_start.json`` and writes it back.
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from benchmarks.common import RESULTS_DIR
from hydraserve.sim.coldstart import simulated_cold_ttft

PIPELINE_SIZES = (1, 2, 4)


def _hydraserve(systems: dict[str, Any], pp: int) -> dict[str, Any] | None:
    found: dict[str, Any] | None = systems.get(f"(d) HydraServe pp{pp}") or systems.get(
        f"(c) HydraServe pp{pp}"
    )
    return found


def _fetches(system: dict[str, Any], pp: int) -> list[tuple[int, float, float]] | None:
    """(rank, start, end) of every stage's fetch, seconds from the request."""
    spans = [system["stages"].get(f"fetch[{rank}]") for rank in range(pp)]
    if any(span is None for span in spans):
        return None
    return [(rank, span[0], span[1]) for rank, span in enumerate(spans)]


def _systems(data: dict[str, Any], rate: float) -> dict[str, Any]:
    entry = next((e for e in data["sweep"] if e["rate_mbit"] == rate), None)
    if entry is None:
        raise ValueError(f"no sweep entry at {rate:g} Mbit/s")
    systems: dict[str, Any] = entry["systems"]
    return systems


def calibrate(data: dict[str, Any], rate: float) -> dict[str, float]:
    """Fit fetch efficiency and post-fetch time from the runs at one rate."""
    rate_bytes = rate * 1e6 / 8
    systems = _systems(data, rate)
    efficiencies: list[float] = []
    post: list[float] = []
    for pp in PIPELINE_SIZES:
        system = _hydraserve(systems, pp)
        fetches = _fetches(system, pp) if system else None
        if system is None or fetches is None:
            continue
        for rank, start, end in fetches:
            nominal = data["stage_bytes"][str(pp)][rank] / rate_bytes
            efficiencies.append(nominal / (end - start))
        last_byte = max(end for _, _, end in fetches)
        if last_byte > data[f"floor_pp{pp}_s"]:  # the fetch, not the engine, was last
            post.append(system["ttft_s"] - last_byte)
    if not efficiencies or not post:
        raise ValueError(f"no HydraServe run at {rate:g} Mbit/s to calibrate on")
    return {
        "fetch_efficiency": round(min(1.0, statistics.median(efficiencies)), 4),
        "post_fetch_s": round(statistics.median(post), 3),
    }


def fidelity(data: dict[str, Any], calibrate_at: float | None = None) -> dict[str, Any]:
    """Measured vs simulated HydraServe cold TTFT at every rate of the sweep, the simulator
    calibrated at ``calibrate_at`` (default: the run's primary rate)."""
    rates = sorted(e["rate_mbit"] for e in data["sweep"])
    at = calibrate_at if calibrate_at is not None else data.get("link_rate_mbit", rates[0])
    constants = calibrate(data, at)
    out: dict[str, Any] = {"calibrated_at_mbit": at, "constants": constants, "rates": {}}
    held_out: list[float] = []
    for rate in rates:
        per_pp: dict[str, Any] = {}
        for pp in PIPELINE_SIZES:
            system = _hydraserve(_systems(data, rate), pp)
            if system is None or f"floor_pp{pp}_s" not in data:
                continue
            simulated = simulated_cold_ttft(
                # The simulated cluster's links carry what a fetch achieved on them.
                link_bytes_per_s=rate * 1e6 / 8 * constants["fetch_efficiency"],
                model_bytes=data["model_bytes"],
                pp=pp,
                engine_ready_floor_s=data[f"floor_pp{pp}_s"],
                post_fetch_s=constants["post_fetch_s"],
                stage_bytes=data["stage_bytes"][str(pp)],
            )
            error = abs(simulated - system["ttft_s"]) / system["ttft_s"]
            per_pp[f"pp{pp}"] = {
                "measured_ttft_s": system["ttft_s"],
                "simulated_ttft_s": round(simulated, 3),
                "relative_error": round(error, 3),
            }
            if rate != at:
                held_out.append(error)
        out["rates"][f"{rate:g}"] = per_pp
    if held_out:
        out["max_relative_error_held_out"] = round(max(held_out), 3)
    contended = data.get("contended")
    if contended is not None and f"floor_pp{contended['pp']}_s" in data:
        # Both models' stages share each node's link; the floor is the uncontended one. The
        # simulator answers the slower model's TTFT.
        simulated = simulated_cold_ttft(
            link_bytes_per_s=contended["rate_mbit"] * 1e6 / 8 * constants["fetch_efficiency"],
            model_bytes=data["model_bytes"],
            pp=contended["pp"],
            engine_ready_floor_s=data[f"floor_pp{contended['pp']}_s"],
            models=contended["models"],
            post_fetch_s=constants["post_fetch_s"],
            stage_bytes=data["stage_bytes"][str(contended["pp"])],
        )
        measured = contended["slowest_ttft_median_s"]
        error = abs(simulated - measured) / measured
        out["contended"] = {
            "measured_ttft_s": measured,
            "simulated_ttft_s": round(simulated, 3),
            "relative_error": round(error, 3),
        }
        held_out.append(error)
        out["max_relative_error_held_out"] = round(max(held_out), 3)
    fitted = out["rates"].get(f"{at:g}", {})
    if fitted:
        out["max_relative_error_at_calibration"] = max(v["relative_error"] for v in fitted.values())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate-at", help="link rate (Mbit/s) to fit the constants at")
    args = parser.parse_args()
    path = RESULTS_DIR / "cold_start.json"
    data = json.loads(path.read_text())
    at = float(args.calibrate_at) if args.calibrate_at else None
    data["sim_fidelity"] = fidelity(data, at)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["sim_fidelity"], indent=2))


if __name__ == "__main__":
    main()
