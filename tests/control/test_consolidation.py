"""The consolidation plan (pure): fetch, start, promote, drain, release, give up."""

from __future__ import annotations

from dataclasses import replace

from hydraserve.api.models import InstancePhase, ModelPhase
from hydraserve.control.consolidation import (
    Abandon,
    ConsolidationPolicy,
    FetchWholeModel,
    PipelineConsolidation,
    Promote,
    Release,
    StandaloneState,
    StartStandalone,
    consolidating,
    consolidation_plan,
)
from hydraserve.control.status import model_phase
from hydraserve.prefetcher.shm import FetchState

POLICY = ConsolidationPolicy(drain_grace_seconds=0.5, drain_timeout_seconds=60.0)
SERVING = PipelineConsolidation(pipeline="p", pp=2, phase=InstancePhase.READY)


def test_a_serving_pipeline_fetches_the_whole_model_and_starts_a_standalone_at_once() -> None:
    assert consolidation_plan([SERVING], POLICY, now=0.0) == [
        FetchWholeModel("p", "local"),
        StartStandalone("p", "local"),
    ]


def test_each_step_is_asked_for_once() -> None:
    started = replace(SERVING, full_fetch=FetchState.FETCHING,
                      standalone=StandaloneState.STARTING)  # fmt: skip
    assert consolidation_plan([started], POLICY, now=1.0) == []
    # The standalone may be warm before the fetch is verified: it waits for the bytes.
    warm = replace(started, standalone=StandaloneState.WARM)
    assert consolidation_plan([warm], POLICY, now=1.0) == []
    fetched = replace(warm, full_fetch=FetchState.DONE)
    assert consolidation_plan([fetched], POLICY, now=1.0) == [Promote("p")]


def test_the_pipeline_is_released_once_idle_for_the_grace_period() -> None:
    draining = replace(SERVING, phase=InstancePhase.DRAINING, draining_since=10.0,
                       standalone=StandaloneState.SERVING, full_fetch=FetchState.DONE,
                       in_flight=2)  # fmt: skip
    assert consolidation_plan([draining], POLICY, now=12.0) == []
    idle = replace(draining, in_flight=0, idle_since=12.0)
    assert consolidation_plan([idle], POLICY, now=12.2) == []  # a request may still arrive
    assert consolidation_plan([idle], POLICY, now=12.6) == [Release("p", "drained")]
    # Unknown load (the engine did not answer) is not idle.
    unknown = replace(draining, in_flight=None)
    assert consolidation_plan([unknown], POLICY, now=30.0) == []


def test_a_pipeline_that_never_drains_is_released_at_the_timeout() -> None:
    busy = replace(SERVING, phase=InstancePhase.DRAINING, draining_since=0.0, in_flight=1)
    (action,) = consolidation_plan([busy], POLICY, now=60.0)
    assert isinstance(action, Release) and "timeout" in action.reason


def test_a_failed_standalone_or_fetch_abandons_and_the_pipeline_keeps_serving() -> None:
    failed = replace(SERVING, standalone=StandaloneState.FAILED, error="exit 1",
                     full_fetch=FetchState.FETCHING)  # fmt: skip
    assert consolidation_plan([failed], POLICY, now=1.0) == [Abandon("p", "exit 1")]
    bad_fetch = replace(SERVING, standalone=StandaloneState.STARTING, full_fetch=FetchState.FAILED)
    (action,) = consolidation_plan([bad_fetch], POLICY, now=1.0)
    assert isinstance(action, Abandon) and "fetch" in action.reason
    assert consolidation_plan([replace(failed, abandoned=True)], POLICY, now=2.0) == []


def test_nothing_happens_when_disabled_or_without_a_pipeline() -> None:
    off = ConsolidationPolicy(enabled=False)
    assert consolidation_plan([SERVING], off, now=0.0) == []
    assert consolidation_plan([replace(SERVING, pp=1)], POLICY, now=0.0) == []
    assert consolidation_plan([replace(SERVING, all_card_node=None)], POLICY, now=0.0) == []
    starting = replace(SERVING, phase=InstancePhase.STARTING)
    assert consolidation_plan([starting], POLICY, now=0.0) == []
    # A draining pipeline is still released when consolidation was turned off meanwhile.
    draining = replace(SERVING, phase=InstancePhase.DRAINING, draining_since=0.0, in_flight=0,
                       idle_since=0.0)  # fmt: skip
    assert consolidation_plan([draining], off, now=1.0) == [Release("p", "drained")]


def test_model_phase_shows_consolidating_then_serving() -> None:
    common = {"error": None, "desired": 1, "live": 1}
    assert model_phase(ready=1, consolidating=True, **common) == ModelPhase.CONSOLIDATING
    assert model_phase(ready=1, consolidating=False, **common) == ModelPhase.SERVING
    assert model_phase(ready=0, consolidating=False, **common) == ModelPhase.STARTING
    assert model_phase(error=None, desired=0, ready=0, live=0, consolidating=False) == "Cold"
    failed = model_phase(error="boom", desired=1, ready=0, live=0, consolidating=False)
    assert failed == ModelPhase.FAILED


def test_consolidating_while_a_pipeline_is_replaced_or_drains() -> None:
    assert consolidating([SERVING], POLICY)
    assert not consolidating([SERVING], replace(POLICY, enabled=False))
    assert not consolidating([replace(SERVING, abandoned=True)], POLICY)
    draining = replace(SERVING, phase=InstancePhase.DRAINING, draining_since=1.0)
    assert consolidating([draining], replace(POLICY, enabled=False))
    assert not consolidating([replace(SERVING, pp=1)], POLICY)
