"""``hydraserve bench sim`` end to end, on a small trace."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from hydraserve.cli.main import app


def test_bench_sim_prints_a_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    result = CliRunner().invoke(
        app,
        [
            "bench", "sim", "--models", "12", "--duration", "120", "--rate", "0.2",
            "--policy", "hydraserve", "--policy", "serverless-vllm", "--json", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "hydraserve" in result.output and "TTFT ok" in result.output
    rows = json.loads(out.read_text())["cells"]
    assert [r["policy"] for r in rows] == ["hydraserve", "serverless-vllm"]
    assert all(0.0 <= r["ttft_attainment"] <= 1.0 for r in rows)


def test_bench_sim_rejects_an_unknown_policy() -> None:
    result = CliRunner().invoke(app, ["bench", "sim", "--policy", "magic"])
    assert result.exit_code != 0
    assert "unknown policy" in result.output
