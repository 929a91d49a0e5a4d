"""Simulator fidelity: the simulator's cold TTFT vs what the cold-start benchmark measured.

The simulator gets only constants measured elsewhere in the same run — the link rate, the
model size and the engine-ready floor of each pipeline size (all bytes local) — and
predicts HydraServe's cold TTFT; the criterion is within 20 % of the measured TTFT.
``python -m benchmarks.cold_start.fidelity`` recomputes it from
``benchmarks/results/cold_start.json`` and writes it back.
"""

from __future__ import annotations

import json
from typing import Any

from benchmarks.common import RESULTS_DIR
from hydraserve.sim.coldstart import simulated_cold_ttft


def fidelity(data: dict[str, Any]) -> dict[str, Any]:
    systems = data["systems"]
    rate_bytes = data["link_rate_mbit"] * 1e6 / 8
    out: dict[str, Any] = {}
    for pp in (1, 2, 4):
        measured = systems.get(f"(d) HydraServe pp{pp}") or systems.get(f"(c) HydraServe pp{pp}")
        floor = next((v for k, v in systems.items() if k.startswith(f"floor pp{pp}")), None)
        if measured is None or floor is None:
            continue
        simulated = simulated_cold_ttft(
            link_bytes_per_s=rate_bytes,
            model_bytes=data["model_bytes"],
            pp=pp,
            engine_ready_floor_s=floor["ttft_s"],
        )
        out[f"pp{pp}"] = {
            "measured_ttft_s": measured["ttft_s"],
            "simulated_ttft_s": round(simulated, 3),
            "relative_error": round(abs(simulated - measured["ttft_s"]) / measured["ttft_s"], 3),
        }
    if out:
        out["max_relative_error"] = max(v["relative_error"] for v in out.values())
    return out


def main() -> None:
    path = RESULTS_DIR / "cold_start.json"
    data = json.loads(path.read_text())
    data["sim_fidelity"] = fidelity(data)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps(data["sim_fidelity"], indent=2))


if __name__ == "__main__":
    main()
