"""The consolidation benchmark's pure parts: memory-time, its curve over horizons, where
consolidation breaks even, and the summary over runs. Synthetic samples only."""

from __future__ import annotations

import argparse
import itertools
from typing import Any

import pytest

from benchmarks.consolidation.run import (
    assemble,
    break_even_horizon,
    figure_names,
    horizon_grid,
    memory_gb_s,
    memory_time_curve,
    print_summary,
    saving_rate_gb,
    summarize_runs,
)
from benchmarks.stats import bootstrap_median_interval

GB = 1_000_000_000


def sampled(
    start: float, knots: list[tuple[float, float]], until: float
) -> list[tuple[float, int]]:
    """Samples every second from ``start`` of memory that is linear between ``knots``
    ((seconds from start, GB)); knots on whole seconds, so trapezoids are exact."""
    samples = []
    for second in range(int(until) + 1):
        for (t0, m0), (t1, m1) in itertools.pairwise(knots):
            if t0 <= second <= t1:
                gb = m0 + (m1 - m0) * (second - t0) / (t1 - t0)
                break
        samples.append((start + second, round(gb * GB)))
    return samples


PIPELINE_START = 1000.0
CONSOLIDATED_START = 5000.0
# The pipeline holds 3 GB throughout.
PIPELINE = sampled(PIPELINE_START, [(0, 3.0), (120, 3.0)], 120)
# Consolidated: the same pipeline; from 30 s a standalone starts beside it (5 GB both);
# at 61 s the pipeline is released and the standalone holds 1 GB.
CONSOLIDATED = sampled(
    CONSOLIDATED_START, [(0, 3.0), (30, 3.0), (31, 5.0), (60, 5.0), (61, 1.0), (120, 1.0)], 120
)
# Cumulative GB·s of CONSOLIDATED by hand: [0, 30] 90; [30, 31] 4; [31, 60] 145; [60, 61] 3;
# then 1 per second. Pipeline: 3 h.
CONSOLIDATED_GBS = {10: 30, 20: 60, 30: 90, 40: 139, 50: 189, 60: 239, 70: 251, 80: 261,
                    90: 271, 100: 281, 110: 291, 120: 301}  # fmt: skip


def test_memory_gb_s_is_trapezoids_cut_at_the_horizon() -> None:
    start = 100.0
    samples = [
        (99.0, 9 * GB),  # before the start: not counted
        (100.0, 0),
        (102.0, 2 * GB),
        (104.0, 2 * GB),
        (106.0, 0),
        (108.0, 9 * GB),  # after the horizon: not counted
    ]
    # 0→2 GB over 2 s: 2; 2 GB for 2 s: 4; 2→0 GB over 2 s: 2.
    assert memory_gb_s(samples, start, 6.0) == pytest.approx(8.0)
    # Cut at 105 s, where the ramp is at 1 GB: 2 + 4 + (2 + 1) / 2.
    assert memory_gb_s(samples, start, 5.0) == pytest.approx(7.5)
    # Cut at 103 s, 2 GB: 2 + 2.
    assert memory_gb_s(samples, start, 3.0) == pytest.approx(4.0)
    assert memory_gb_s(samples, start, 0.0) == 0.0
    assert memory_gb_s([], start, 10.0) == 0.0


def test_memory_gb_s_of_the_synthetic_arms() -> None:
    for h, gbs in CONSOLIDATED_GBS.items():
        assert memory_gb_s(CONSOLIDATED, CONSOLIDATED_START, h) == pytest.approx(gbs)
        assert memory_gb_s(PIPELINE, PIPELINE_START, h) == pytest.approx(3 * h)
    # Off the sample grid: 30.5 s is halfway up the 3→5 GB ramp (4 GB): 90 + (3 + 4) / 4.
    assert memory_gb_s(CONSOLIDATED, CONSOLIDATED_START, 30.5) == pytest.approx(91.75)


def test_horizon_grid_every_ten_seconds_and_the_horizon() -> None:
    assert horizon_grid(45.0) == [10.0, 20.0, 30.0, 40.0, 45.0]
    assert horizon_grid(150.0) == [10.0 * i for i in range(1, 16)]
    assert horizon_grid(5.0) == [5.0]


def test_memory_time_curve_per_arm_from_its_own_start() -> None:
    curve = memory_time_curve(
        {
            "pipeline": (PIPELINE_START, PIPELINE),
            "consolidated": (CONSOLIDATED_START, CONSOLIDATED),
        },
        45.0,
    )
    assert [p["horizon_s"] for p in curve] == [10.0, 20.0, 30.0, 40.0, 45.0]
    assert [p["pipeline"] for p in curve] == pytest.approx([30, 60, 90, 120, 135])
    # 45 s: 139 + 5 GB for 5 s.
    assert [p["consolidated"] for p in curve] == pytest.approx([30, 60, 90, 139, 164])


def curve_to(horizon: float) -> list[dict[str, float]]:
    return memory_time_curve(
        {
            "pipeline": (PIPELINE_START, PIPELINE),
            "consolidated": (CONSOLIDATED_START, CONSOLIDATED),
        },
        horizon,
    )


def test_break_even_inside_the_horizon_is_where_it_stays_ahead() -> None:
    # Equal at 10-30 s, behind 40-90 s (271 > 270 at 90 s), ahead from 100 s (281 <= 300):
    # the early ties do not count, since it falls behind after them.
    rate = saving_rate_gb(
        (PIPELINE_START, PIPELINE), (CONSOLIDATED_START, CONSOLIDATED), 61.0, 120.0
    )
    assert rate == pytest.approx(2.0)
    assert break_even_horizon(curve_to(120.0), rate) == (100.0, False)


def test_break_even_extrapolated_from_the_saving_after_the_release() -> None:
    # At 80 s: 261 vs 240 GB·s, 21 behind; after the release it saves 3 - 1 = 2 GB a
    # second: even at 80 + 21 / 2.
    rate = saving_rate_gb(
        (PIPELINE_START, PIPELINE), (CONSOLIDATED_START, CONSOLIDATED), 61.0, 80.0
    )
    assert rate == pytest.approx(2.0)
    horizon, extrapolated = break_even_horizon(curve_to(80.0), rate)
    assert extrapolated is True
    assert horizon == pytest.approx(90.5)


def test_break_even_never_when_the_standalone_is_no_smaller() -> None:
    # After the release the standalone holds 3.5 GB, more than the pipeline's 3.
    heavier = sampled(
        CONSOLIDATED_START,
        [(0, 3.0), (30, 3.0), (31, 5.0), (60, 5.0), (61, 3.5), (120, 3.5)],
        120,
    )
    arms = {"pipeline": (PIPELINE_START, PIPELINE), "consolidated": (CONSOLIDATED_START, heavier)}
    rate = saving_rate_gb(arms["pipeline"], arms["consolidated"], 61.0, 120.0)
    assert rate == pytest.approx(-0.5)
    assert break_even_horizon(memory_time_curve(arms, 120.0), rate) == (None, False)


def test_break_even_never_without_a_release() -> None:
    pipeline, consolidated = (PIPELINE_START, PIPELINE), (CONSOLIDATED_START, CONSOLIDATED)
    assert saving_rate_gb(pipeline, consolidated, None, 80.0) is None
    assert saving_rate_gb(pipeline, consolidated, 80.0, 80.0) is None  # released at the end
    assert break_even_horizon(curve_to(50.0), None) == (None, False)


def test_break_even_at_the_first_point_when_never_behind() -> None:
    curve = [
        {"horizon_s": 10.0, "pipeline": 30.0, "consolidated": 29.0},
        {"horizon_s": 20.0, "pipeline": 60.0, "consolidated": 60.0},
    ]
    assert break_even_horizon(curve, None) == (10.0, False)
    assert break_even_horizon([], 1.0) == (None, False)


RUNS: list[dict[str, Any]] = [
    {
        "tpot_standalone_ms": 5.0,
        "switch_gap_ms": None,
        "cold_ttft_s": {"standalone": 3.0, "pipeline": 4.5},
        "consolidation_s": {"total": 80.0, "fetch": 0.1},
        "failed_requests": 0,
        "break_even_horizon_s": 120.0,
        "break_even_extrapolated": False,
    },
    {
        "tpot_standalone_ms": 7.0,
        "switch_gap_ms": None,
        "cold_ttft_s": {"standalone": 3.4, "pipeline": 4.0, "consolidated": 4.1},
        "consolidation_s": {"total": None},
        "failed_requests": 2,
        "break_even_horizon_s": None,
        "break_even_extrapolated": False,
    },
    {
        "tpot_standalone_ms": 4.0,
        "switch_gap_ms": None,
        "cold_ttft_s": {"standalone": 2.0, "pipeline": 5.0},
        "consolidation_s": {"total": 90.0},
        "failed_requests": 1,
        "break_even_horizon_s": 170.5,
        "break_even_extrapolated": True,
    },
]


def test_figure_names_expand_every_key_any_run_has() -> None:
    assert figure_names(RUNS, ["tpot_standalone_ms", "cold_ttft_s.*"]) == [
        "tpot_standalone_ms",
        "cold_ttft_s.standalone",
        "cold_ttft_s.pipeline",
        "cold_ttft_s.consolidated",
    ]


def test_summary_over_runs_median_interval_and_every_run() -> None:
    summary = summarize_runs(RUNS)
    assert summary["tpot_standalone_ms"] == {
        "median": 5.0,
        "ci95": list(bootstrap_median_interval([5.0, 7.0, 4.0])),
        "all": [5.0, 7.0, 4.0],
    }
    assert summary["tpot_standalone_ms"]["ci95"] == [4.0, 7.0]
    # None skipped: the one run that has it.
    assert summary["cold_ttft_s.consolidated"] == {"median": 4.1, "ci95": [4.1, 4.1], "all": [4.1]}
    assert summary["consolidation_s.total"]["all"] == [80.0, 90.0]
    assert summary["consolidation_s.total"]["median"] == 85.0
    assert summary["cold_ttft_s.pipeline"]["median"] == 4.5
    assert summary["failed_requests"]["sum"] == 3
    assert summary["failed_requests"]["median"] == 1
    assert summary["break_even_horizon_s"]["all"] == [120.0, 170.5]
    assert summary["break_even_horizon_s"]["extrapolated"] == [False, True]
    # No values (all None, or no run has it): left out.
    assert "switch_gap_ms" not in summary
    assert "memory_saving" not in summary
    assert "consolidation_s.fetch" not in summary  # not a key figure
    assert summarize_runs([]) == {}


def test_the_result_file_and_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    args = argparse.Namespace(
        runs=5, size="tiny", clients=2, max_tokens=96, horizon=150.0, paired=40.0
    )
    result = assemble(args, RUNS[:2], [{"run": 3, "error": "RuntimeError('boom')"}], {})
    assert result["config"]["runs"] == 5
    assert result["config"]["runs_completed"] == 2
    assert result["runs"] == RUNS[:2]
    assert result["summary"]["failed_requests"]["sum"] == 2
    print_summary(result)
    table = capsys.readouterr().out
    assert "tpot_standalone_ms" in table
    assert "5, 7" in table
    assert "(sum 2)" in table
    assert "run 3 failed" in table
