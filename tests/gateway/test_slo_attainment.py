"""Live SLO attainment: per model, the share of streaming requests that met its TTFT and
TPOT SLOs, cold and warm apart — counters, ``GET /v1/models/{id}`` and the status the
backend is told to keep."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tests.support.fakes import FakeClusterBackend, make_model, ready_instance

from .conftest import Harness, RunningEngine, eventually, fast_settings

StartEngine = Callable[..., Awaitable[RunningEngine]]
StartGateway = Callable[..., Awaitable[Harness]]

# The engine answers its first token after 0.2 s, then a token every 20 ms.
TIGHT = {"ttftSeconds": 0.05, "tpotMilliseconds": 5}  # both missed
LOOSE = {"ttftSeconds": 10, "tpotMilliseconds": 1000}  # both met


async def stream(gw: Harness, model: str) -> None:
    body = {"model": model, "prompt": "hi", "max_tokens": 4, "stream": True}
    async with gw.client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        await response.aread()


async def test_tight_and_loose_slos_are_counted_shown_and_reported(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    engine.engine.behaviour.first_token_delay = 0.2
    engine.engine.behaviour.token_delay = 0.02
    backend = FakeClusterBackend(
        [make_model("tight", slo=TIGHT), make_model("loose", slo=LOOSE)],
        endpoint_for=lambda model, i: engine.url,
        cold_start_seconds=0.1,
    )
    gw = await start_gateway(backend, fast_settings(slo_report_seconds=0.05))
    for model in ("tight", "loose"):
        await stream(gw, model)  # cold: no instance was ready
        await eventually(lambda m=model: bool(backend.get_model(m).ready_instances))  # type: ignore[union-attr]
        for _ in range(2):
            await stream(gw, model)  # warm

    async def count(model: str, slo: str, start: str, outcome: str) -> float:
        return await gw.metric(
            "hydraserve_gateway_slo_requests_total",
            model=f"default/{model}", slo=slo, start=start, outcome=outcome,
        )  # fmt: skip

    assert await count("tight", "ttft", "cold", "missed") == 1
    assert await count("tight", "ttft", "warm", "missed") == 2
    assert await count("tight", "tpot", "warm", "missed") == 2
    assert await count("tight", "ttft", "warm", "met") == 0
    assert await count("loose", "ttft", "cold", "met") == 1
    assert await count("loose", "ttft", "warm", "met") == 2
    assert await count("loose", "tpot", "warm", "met") == 2

    card = (await gw.client.get("/v1/models/tight")).json()["hydraserve"]["slo_attainment"]
    assert card["ttftWarm"] == {"met": 0, "missed": 2, "ratio": 0.0}
    assert card["ttftCold"]["missed"] == 1
    loose = (await gw.client.get("/v1/models/loose")).json()["hydraserve"]["slo_attainment"]
    assert loose["ttftWarm"]["ratio"] == 1.0 and loose["tpotWarm"]["ratio"] == 1.0

    # The backend is told (under its own key, the bare name here), so it lands in each
    # model's status (status.sloAttainment).
    await eventually(lambda: {"tight", "loose"} <= set(backend.slo_reports), what="reports")
    assert backend.slo_reports["tight"].ttft_warm.ratio == 0.0
    assert backend.slo_reports["loose"].ttft_cold.ratio == 1.0
    gauge = await gw.metric(
        "hydraserve_gateway_slo_attainment_ratio", model="default/loose", slo="ttft", start="warm"
    )
    assert gauge == 1.0


async def test_a_model_with_no_requests_has_no_attainment(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend([make_model("m")])
    backend.set_instances("m", [ready_instance("m", "m-0", engine.url)])
    gw = await start_gateway(backend, fast_settings())
    card = (await gw.client.get("/v1/models/m")).json()["hydraserve"]
    assert card["slo_attainment"] is None


def test_the_window_forgets_old_requests() -> None:
    from hydraserve.gateway.slo import SloWindow

    window = SloWindow(window_seconds=60)
    slos = {"ttft_slo_s": 1.0, "tpot_slo_s": 0.1}
    window.observe("m", 0.0, cold=True, ttft_s=5.0, tpot_s=None, **slos)
    window.observe("m", 50.0, cold=False, ttft_s=0.5, tpot_s=0.2, **slos)
    at_55 = window.attainment("m", 55.0)
    assert at_55 is not None
    assert (at_55.ttft_cold.missed, at_55.ttft_warm.met, at_55.tpot_warm.missed) == (1, 1, 1)
    assert at_55.tpot_cold.ratio is None  # a one-token request has no TPOT
    at_100 = window.attainment("m", 100.0)
    assert at_100 is not None and at_100.ttft_cold.ratio is None and at_100.ttft_warm.met == 1
    assert window.attainment("m", 200.0) is None
