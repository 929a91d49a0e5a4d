"""Replaying recorded cold starts: the same planner inputs, planned with the configured and
with the calibrated constants, show how calibration changes the plan."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from hydraserve.cli.main import app
from hydraserve.planner.calibration import CalibrationSettings, Calibrator
from hydraserve.sim.replay import replay
from tests.planner.test_calibration import NODES, REQUEST, WRONG, cached_cold_start


def calibrated_history() -> Calibrator:
    calibrator = Calibrator(CalibrationSettings(calibration_min_interval_seconds=0))
    for i in range(5):
        record = cached_cold_start(i, calibrator.config(WRONG).engine_ready_floor_s)
        calibrator.observe(record, WRONG, float(i))
        calibrator.remember(record, (REQUEST, NODES), float(i))
    return calibrator


def test_replay_shows_the_calibrated_planner_choosing_a_pipeline() -> None:
    calibrator = calibrated_history()
    assert len(calibrator.state.history) == 5
    rows = replay(calibrator.state.history, WRONG, calibrator.config(WRONG))
    assert {(r.base_pp, r.calibrated_pp) for r in rows} == {(1, 2)}
    row = rows[0]
    assert row.base_ready_s is not None and row.calibrated_ready_s is not None
    # The calibrated prediction is close to what was measured; the configured one is not.
    assert abs(row.calibrated_ready_s - row.measured_ready_s) < 1.5
    assert row.base_ready_s - row.measured_ready_s > 8


def test_bench_replay_command(tmp_path: Path) -> None:
    state = tmp_path / "planner-calibration.json"
    state.write_text(calibrated_history().state.model_dump_json())
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "replay",
            str(state),
            "--planner",
            WRONG.model_dump_json(),
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "5 recorded cold starts" in result.output
    rows = json.loads(out.read_text())
    assert [(r["base_pp"], r["calibrated_pp"]) for r in rows] == [(1, 2)] * 5
