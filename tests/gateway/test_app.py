"""Routes the gateway answers itself: models, health, metrics, the OpenAPI document."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from prometheus_client.parser import text_string_to_metric_families

from hydraserve.backends.base import InstancePhase, InstanceView
from tests.support.fakes import FakeClusterBackend, make_model, ready_instance

from .conftest import Harness, RunningEngine

StartEngine = Callable[..., Awaitable[RunningEngine]]
StartGateway = Callable[..., Awaitable[Harness]]


async def test_models_are_listed_from_the_backend(start_gateway: StartGateway) -> None:
    backend = FakeClusterBackend([make_model("alpha"), make_model("beta")])
    backend.set_instances("alpha", [ready_instance("alpha", "alpha-0", "http://x"),
                                    InstanceView(name="alpha-1", model="alpha", pp=2,
                                                 phase=InstancePhase.STARTING)])  # fmt: skip
    backend.set_error("beta", "not in the store")
    gw = await start_gateway(backend)
    listing = (await gw.client.get("/v1/models")).json()
    assert listing["object"] == "list"
    cards = {card["id"]: card for card in listing["data"]}
    # Canonical ids (decision 0502): namespace/name; owned_by is the namespace.
    assert set(cards) == {"default/alpha", "default/beta"}
    cards = {card["id"].removeprefix("default/"): card for card in listing["data"]}
    assert cards["alpha"]["owned_by"] == "default"
    assert cards["alpha"]["object"] == "model"
    assert isinstance(cards["alpha"]["created"], int)
    assert cards["alpha"]["hydraserve"]["ready_instances"] == 1
    assert cards["alpha"]["hydraserve"]["starting_instances"] == 1
    assert cards["beta"]["hydraserve"]["error"] == "not in the store"
    # Retrieved by bare name (unique here) or by canonical id: the same card.
    one = (await gw.client.get("/v1/models/alpha")).json()
    assert one["id"] == "default/alpha"
    qualified = await gw.client.get("/v1/models/default/alpha")
    assert qualified.status_code == 200 and qualified.json()["id"] == "default/alpha"
    backend.add_model(make_model("gamma"))
    assert len((await gw.client.get("/v1/models")).json()["data"]) == 3


async def test_healthz(start_gateway: StartGateway) -> None:
    gw = await start_gateway(FakeClusterBackend())
    response = await gw.client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


async def test_metrics_use_prometheus_naming_and_bounded_labels(
    start_engine: StartEngine, start_gateway: StartGateway
) -> None:
    engine = await start_engine()
    backend = FakeClusterBackend([make_model("m")])
    backend.set_instances("m", [ready_instance("m", "m-0", engine.url)])
    gw = await start_gateway(backend)
    await gw.client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    for i in range(5):
        await gw.client.post("/v1/completions", json={"model": f"made-up-{i}", "prompt": "x"})
    response = await gw.client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    for name in (
        "hydraserve_gateway_requests",
        "hydraserve_gateway_request_duration_seconds",
        "hydraserve_gateway_time_to_first_token_seconds",
        "hydraserve_gateway_time_per_output_token_seconds",
        "hydraserve_gateway_queue_depth",
        "hydraserve_gateway_queue_wait_seconds",
        "hydraserve_gateway_in_flight_requests",
        "hydraserve_cold_starts",
        "hydraserve_cold_start_stage_seconds",
        "hydraserve_instances",
    ):
        assert name in families, name
    requests = {
        (s.labels["model"], s.labels["status"]): s.value
        for s in families["hydraserve_gateway_requests"].samples
        if s.name.endswith("_total")
    }
    assert requests[("default/m", "200")] == 1
    assert requests[("_unknown", "404")] == 5  # made-up names do not become labels


async def test_openapi_document_describes_openai_errors_not_422(
    start_gateway: StartGateway,
) -> None:
    gw = await start_gateway(FakeClusterBackend())
    document = (await gw.client.get("/openapi.json")).json()
    completions = document["paths"]["/v1/completions"]["post"]
    assert "422" not in completions["responses"]
    for status in ("400", "404", "429", "503"):
        assert status in completions["responses"]
    assert "HTTPValidationError" not in document["components"]["schemas"]
    assert "security" not in completions  # auth is off in these settings
