"""The planner calibrates its engine-ready floor and fetch efficiency from measured cold
starts: a floor configured 3× too high is fitted to within 20 % after a few cold starts,
the planner's pp choice changes with it, and pinning keeps the configured constants."""

from __future__ import annotations

from hydraserve.planner import SLO, Plan, PlanRequest, plan
from hydraserve.planner.calibration import (
    CalibrationSettings,
    CalibrationState,
    Calibrator,
    ColdStartRecord,
)
from tests.planner.helpers import CONFIG, GB, cluster, model, node

TRUE_FLOOR = 5.0
WRONG = CONFIG.model_copy(update={"engine_ready_floor_s": 3 * TRUE_FLOOR})
NODES = cluster(node("a", nic=1 * GB), node("b", nic=1 * GB))
REQUEST = PlanRequest(model(), SLO(ttft_s=8.0, tpot_s=1.0))


def cached_cold_start(i: int, floor: float, jitter: float = 0.0) -> ColdStartRecord:
    """A cold start from the host cache (bytes verified after 0.8 s): the engine bound it,
    so it was ready at the true floor plus post-fetch."""
    return ColdStartRecord(
        model="m",
        instance=f"m-{i}",
        pp=1,
        predicted_ready_s=floor + CONFIG.post_fetch_s,
        measured_ready_s=TRUE_FLOOR + jitter + CONFIG.post_fetch_s,
        measured_fetch_s=0.8,
        terms={"startup_s": floor, "post_fetch_s": CONFIG.post_fetch_s, "fetch_s": 0.8},
    )


def chosen_pp(config: object) -> int:
    result = plan(REQUEST, NODES, config)  # type: ignore[arg-type]
    assert isinstance(result, Plan)
    return result.pp


def test_a_floor_three_times_too_high_is_fitted_and_changes_the_plan() -> None:
    assert WRONG.engine_ready_floor_s == 3 * TRUE_FLOOR
    # With a 15 s floor no plan meets an 8 s SLO: the pp = 1 fallback.
    assert chosen_pp(WRONG) == 1
    calibrator = Calibrator(CalibrationSettings(calibration_min_interval_seconds=60))
    now = 0.0
    for i, jitter in enumerate([0.2, -0.3, 0.1, 0.4, -0.1, 0.0]):
        now += 61  # one cold start a minute: the rate limit lets each update through
        floor = calibrator.config(WRONG).engine_ready_floor_s
        calibrator.observe(cached_cold_start(i, floor, jitter), WRONG, now)
    fitted = calibrator.config(WRONG).engine_ready_floor_s
    assert abs(fitted - TRUE_FLOOR) <= 0.2 * TRUE_FLOOR, fitted
    # With the fitted floor a pipeline meets the SLO: pp = 2 (each node fetches half).
    assert chosen_pp(calibrator.config(WRONG)) == 2
    # The state round-trips through its persisted form.
    again = Calibrator(
        CalibrationSettings(),
        CalibrationState.model_validate_json(calibrator.state.model_dump_json()),
    )
    assert again.config(WRONG) == calibrator.config(WRONG)


def test_pinning_keeps_the_configured_constants() -> None:
    calibrator = Calibrator(CalibrationSettings(calibration=False))
    for i in range(6):
        assert calibrator.observe(cached_cold_start(i, 15.0), WRONG, 100.0 * i) == []
    assert calibrator.config(WRONG) == WRONG
    assert chosen_pp(calibrator.config(WRONG)) == 1


def test_updates_are_bounded_and_rate_limited() -> None:
    settings = CalibrationSettings(calibration_min_samples=1, calibration_max_step=2.0)
    calibrator = Calibrator(settings)
    calibrator.observe(cached_cold_start(0, 15.0), WRONG, 0.0)
    assert calibrator.config(WRONG).engine_ready_floor_s == 7.5  # at most ÷2 per update
    calibrator.observe(cached_cold_start(1, 7.5), WRONG, 30.0)  # within the interval
    assert calibrator.config(WRONG).engine_ready_floor_s == 7.5
    # A straggler does not drag the median far.
    for i, at in enumerate((100.0, 200.0, 300.0)):
        calibrator.observe(cached_cold_start(2 + i, 7.5), WRONG, at)
    calibrator.observe(cached_cold_start(9, 5.0, jitter=300.0), WRONG, 400.0)
    assert calibrator.config(WRONG).engine_ready_floor_s < 7.0


def test_a_fetch_bound_cold_start_fits_the_fetch_efficiency() -> None:
    calibrator = Calibrator(CalibrationSettings(calibration_min_samples=2))
    for i, at in enumerate((0.0, 100.0, 200.0)):
        record = ColdStartRecord(
            model="m", instance=f"m-{i}", pp=2,
            predicted_ready_s=5.0, measured_ready_s=6.0, measured_fetch_s=5.0,
            terms={"fetch_s": 4.0, "post_fetch_s": 1.0, "fetch_efficiency": 1.0},
        )  # fmt: skip
        calibrator.observe(record, CONFIG, at)
    # The links delivered 4 s of planned bytes in 5 s: 80 % of the line rate.
    assert calibrator.config(CONFIG).fetch_efficiency == 0.8
    assert calibrator.config(CONFIG).engine_ready_floor_s == CONFIG.engine_ready_floor_s


def test_floors_are_fitted_per_gpu_type_and_planned_per_node() -> None:
    calibrator = Calibrator(CalibrationSettings(calibration_min_interval_seconds=0))
    true_floors = {"a10": 5.0, "v100": 12.0}
    for i in range(4):
        for gpu_type, floor in true_floors.items():
            record = ColdStartRecord(
                model="m", instance=f"m-{gpu_type}-{i}", pp=1,
                predicted_ready_s=16.0, measured_ready_s=floor + CONFIG.post_fetch_s,
                measured_fetch_s=0.8, gpu_type=gpu_type,
                terms={"startup_s": 15.0, "post_fetch_s": CONFIG.post_fetch_s, "fetch_s": 0.8},
            )  # fmt: skip
            calibrator.observe(record, WRONG, float(i))
    config = calibrator.config(WRONG)
    for gpu_type, floor in true_floors.items():
        assert abs(config.floor_for(gpu_type) - floor) <= 0.2 * floor, (gpu_type, config)
    assert config.engine_ready_floor_s == WRONG.engine_ready_floor_s  # other types keep it
    # Each plan takes its nodes' floor: on fast-starting nodes a pipeline meets the SLO,
    # on slow-starting ones nothing does (the pp = 1 fallback).
    for gpu_type, pp in (("a10", 2), ("v100", 1)):
        nodes = cluster(
            node("a", nic=1 * GB, gpu_type=gpu_type), node("b", nic=1 * GB, gpu_type=gpu_type)
        )
        result = plan(REQUEST, nodes, config)
        assert isinstance(result, Plan) and result.pp == pp, (gpu_type, result)
        assert {s.gpu_type for s in result.stages} == {gpu_type}
