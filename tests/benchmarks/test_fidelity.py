"""The cold-start fidelity check: constants fitted at one rate, predictions at the others."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.cold_start.fidelity import calibrate, fidelity

STAGE_BYTES = {
    "1": [1_000_000_000],
    "2": [520_000_000, 480_000_000],
    "4": [280_000_000] + [240_000_000] * 3,
}
FLOORS = {1: 5.0, 2: 8.0, 4: 12.0}


def measured_run(efficiency: float, post_fetch_s: float, rates: list[float]) -> dict[str, Any]:
    """What a run would record if the cold start were exactly: each stage fetches at
    ``efficiency`` of the link, and the first token comes ``post_fetch_s`` after the last
    byte unless the engine-ready floor comes later."""
    data: dict[str, Any] = {
        "model_bytes": 1_000_000_000,
        "stage_bytes": STAGE_BYTES,
        "sweep": [],
        **{f"floor_pp{pp}_s": floor for pp, floor in FLOORS.items()},
    }
    for rate in rates:
        systems = {}
        for pp in (1, 2, 4):
            stages = {
                f"fetch[{rank}]": [0.0, size / (rate * 1e6 / 8 * efficiency)]
                for rank, size in enumerate(STAGE_BYTES[str(pp)])
            }
            last = max(end for _, end in stages.values())
            name = f"({'c' if pp == 1 else 'd'}) HydraServe pp{pp}"
            systems[name] = {"ttft_s": max(FLOORS[pp], last + post_fetch_s), "stages": stages}
        data["sweep"].append({"rate_mbit": rate, "systems": systems})
    return data


def test_calibration_recovers_the_constants_that_made_the_run() -> None:
    data = measured_run(0.8, 1.5, [100.0])
    assert calibrate(data, 100.0) == {"fetch_efficiency": 0.8, "post_fetch_s": 1.5}


def test_a_run_that_follows_the_model_is_predicted_at_rates_it_was_not_fitted_on() -> None:
    data = measured_run(0.8, 1.5, [25.0, 50.0, 100.0, 200.0])
    out = fidelity(data, calibrate_at=100.0)
    assert out["constants"] == {"fetch_efficiency": 0.8, "post_fetch_s": 1.5}
    assert set(out["rates"]) == {"25", "50", "100", "200"}
    assert out["max_relative_error_held_out"] < 0.02


def test_a_run_the_model_does_not_describe_shows_a_large_held_out_error() -> None:
    # Fitted at 100 Mbit/s; at the other rates the fetch ran at a quarter of that efficiency.
    fitted = measured_run(0.8, 1.5, [100.0])
    slower = measured_run(0.2, 1.5, [25.0, 200.0])
    data = {**fitted, "sweep": fitted["sweep"] + slower["sweep"]}
    out = fidelity(data, calibrate_at=100.0)
    assert out["max_relative_error_at_calibration"] < 0.02
    assert out["max_relative_error_held_out"] > 0.5


def test_calibrating_needs_a_run_at_that_rate() -> None:
    with pytest.raises(ValueError, match="no sweep entry at 50 Mbit/s"):
        calibrate(measured_run(0.8, 1.5, [100.0]), 50.0)


def test_the_contended_case_is_predicted_with_the_links_shared() -> None:
    data = measured_run(0.8, 1.5, [100.0, 200.0])
    # Two models as pp 2 pipelines on the same nodes: each link carries both stage 0s.
    both = 2 * STAGE_BYTES["2"][0] / (100e6 / 8 * 0.8) + 1.5
    data["contended"] = {"rate_mbit": 100.0, "pp": 2, "models": 2, "slowest_ttft_median_s": both}
    out = fidelity(data, calibrate_at=100.0)
    assert out["contended"]["relative_error"] < 0.02
    # Had the simulator not shared the links, it would have predicted about half.
    data["contended"]["slowest_ttft_median_s"] = both / 2
    assert fidelity(data, calibrate_at=100.0)["contended"]["relative_error"] > 0.5
