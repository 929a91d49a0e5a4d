"""Pure helpers of the benchmarks: bands over sweeps and spreads over repeated runs."""

from __future__ import annotations

import math

import pytest

from benchmarks.slo_attainment.band import band, point_label, ratio, spread
from benchmarks.stats import (
    bootstrap_median_interval,
    paired_differences,
    percentile,
    stream_timing,
)


def test_band_reports_min_median_max_and_where() -> None:
    b = band({"a": 2.0, "b": 1.5, "c": 3.0, "d": 1.8})
    assert (b.min, b.median, b.max, b.points) == (1.5, 1.9, 3.0, 4)
    assert (b.argmin, b.argmax) == ("b", "c")
    assert b.as_dict(2) == {
        "min": 1.5, "median": 1.9, "max": 3.0, "points": 4, "argmin": "b", "argmax": "c",
    }  # fmt: skip


def test_band_of_one_point_is_that_point() -> None:
    b = band({"only": 1.7})
    assert b.min == b.median == b.max == 1.7


def test_empty_band_and_spread_are_errors() -> None:
    with pytest.raises(ValueError):
        band({})
    with pytest.raises(ValueError):
        spread([])


def test_ratio_against_a_baseline_at_zero_is_infinite() -> None:
    assert ratio(0.9, 0.45) == pytest.approx(2.0)
    assert math.isinf(ratio(0.5, 0.0))


def test_spread_is_median_not_best() -> None:
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3.0}


def test_point_labels() -> None:
    assert point_label(15.0, 64.0) == "floor15s_store64Gbps"
    assert point_label(4.0, None) == "floor4s_storeunlimited"


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile([7.0], 0.99) == 7.0


def test_stream_timing_gives_ttft_and_gaps() -> None:
    ttft, gaps = stream_timing(10.0, [10.5, 10.53, 10.57])
    assert ttft == pytest.approx(0.5)
    assert gaps == pytest.approx([0.03, 0.04])
    with pytest.raises(ValueError):
        stream_timing(0.0, [])


def test_paired_differences_pair_rounds() -> None:
    assert paired_differences([3.0, 5.0], [1.0, 1.5]) == [2.0, 3.5]
    with pytest.raises(ValueError):
        paired_differences([1.0], [])


def test_bootstrap_interval_of_two_values_is_their_range() -> None:
    # Resamples of [1, 2]: medians 1 (1/4), 1.5 (1/2), 2 (1/4); the 2.5 % and 97.5 %
    # quantiles of 10 000 of them fall in the outer quarters.
    assert bootstrap_median_interval([1.0, 2.0]) == (1.0, 2.0)


def test_bootstrap_interval_is_seeded_and_brackets_the_median() -> None:
    values = [4.9, 5.3, 5.0, 7.8, 5.1]
    low, high = bootstrap_median_interval(values)
    assert (low, high) == bootstrap_median_interval(values)  # pure: same input, same answer
    # Of five values, a resample's median is the smallest with probability
    # P(Binomial(5, 1/5) >= 3) = 5.8 % > 2.5 %: the 95 % interval is [min, max].
    assert (low, high) == (4.9, 7.8)
    # At 50 %: P(median <= 2nd smallest) = P(Binomial(5, 2/5) >= 3) = 31.7 % > 25 % while
    # P(median <= smallest) = 5.8 % < 25 %: the 2nd smallest and (symmetric) 2nd largest.
    assert bootstrap_median_interval(values, confidence=0.5) == (5.0, 5.3)


def test_bootstrap_interval_of_one_value_and_of_none() -> None:
    assert bootstrap_median_interval([3.25]) == (3.25, 3.25)
    assert bootstrap_median_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    with pytest.raises(ValueError):
        bootstrap_median_interval([])
    with pytest.raises(ValueError):
        bootstrap_median_interval([1.0, 2.0], confidence=1.0)
