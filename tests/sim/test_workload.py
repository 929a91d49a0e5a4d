"""Workload generation: seeded, Gamma arrivals with the asked rate and CV, paper's SLOs."""

from __future__ import annotations

import numpy as np
import pytest

from hydraserve.sim.catalog import LLAMA2_7B, LLAMA2_13B
from hydraserve.sim.workload import APPS, gamma_arrivals, make_models, make_workload


@pytest.mark.parametrize("cv", [1.0, 2.0, 4.0])
def test_gamma_arrivals_have_the_asked_rate_and_cv(cv: float) -> None:
    rng = np.random.default_rng(7)
    times = gamma_arrivals(rate=2.0, cv=cv, duration_s=50_000.0, rng=rng)
    gaps = np.diff(times)
    assert len(times) / 50_000.0 == pytest.approx(2.0, rel=0.1)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.15)
    assert times.min() >= 0 and times.max() < 50_000.0
    assert np.all(np.diff(times) >= 0)


def test_models_split_like_the_paper() -> None:
    models = make_models(384)
    counts: dict[tuple[str, str], int] = {}
    for m in models:
        counts[(m.app, m.size)] = counts.get((m.app, m.size), 0) + 1
    assert set(counts.values()) == {64} and len(counts) == 6
    by_kind = {(m.app, m.size): m for m in models}
    assert by_kind[("chatbot", "7b")].slo.ttft_s == 7.5
    assert by_kind[("code", "13b")].slo.ttft_s == 12.0
    assert by_kind[("summarization", "13b")].slo.ttft_s == 60.0
    assert by_kind[("chatbot", "13b")].slo.tpot_s == 0.2
    assert by_kind[("code", "7b")].slo.tpot_s == 0.084
    assert by_kind[("summarization", "13b")].slo.tpot_s == 0.116
    assert len({m.name for m in models}) == 384


def test_model_sizes_are_llama2_shapes() -> None:
    assert LLAMA2_7B.total_bytes / 1e9 == pytest.approx(13.5, abs=0.1)
    assert LLAMA2_13B.total_bytes / 1e9 == pytest.approx(26.0, abs=0.1)
    assert sorted(LLAMA2_13B.manifest.partitions) == [1, 2, 3, 4]


def test_workload_is_seeded() -> None:
    a = make_workload(models=48, rate=0.5, cv=2.0, duration_s=600.0, seed=3)
    b = make_workload(models=48, rate=0.5, cv=2.0, duration_s=600.0, seed=3)
    c = make_workload(models=48, rate=0.5, cv=2.0, duration_s=600.0, seed=4)
    assert a.arrivals == b.arrivals
    assert a.arrivals != c.arrivals
    assert all(0 <= x.time < 600.0 for x in a.arrivals)
    assert [x.time for x in a.arrivals] == sorted(x.time for x in a.arrivals)
    for x in a.arrivals:
        app = APPS[a.models[x.model].app]
        assert 2 <= x.prompt_tokens <= app.prompt_max
        assert 2 <= x.output_tokens <= app.output_max


def test_popularity_is_skewed() -> None:
    workload = make_workload(models=96, rate=2.0, cv=1.0, duration_s=3600.0, seed=0)
    counts = np.bincount([a.model for a in workload.arrivals], minlength=96)
    top = np.sort(counts)[::-1]
    assert top[:10].sum() > 0.3 * counts.sum()  # Zipf 0.8: the top 10 % get a third
