"""Property-based run of the gateway's own OpenAPI document: no input may cause a 5xx,
and answers must match the document (status codes, content types, schemas)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from hydraserve.gateway import create_app
from hydraserve.gateway.auth import Authenticator, hash_key
from tests.support.fakes import (
    FakeClusterBackend,
    FakeEngine,
    ServerThread,
    make_model,
    ready_instance,
)

from .conftest import fast_settings

KEY = "hs-schemathesis-test-key"

# The document depends only on the routes and whether auth is on; build it offline so the
# test cases can be generated at collection time.
_document = create_app(FakeClusterBackend(), fast_settings(),
                       authenticator=Authenticator([])).openapi()  # fmt: skip
schema = schemathesis.openapi.from_dict(_document)


@pytest.fixture(scope="module")
def gateway_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys: Path = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "fuzz", "sha256": hash_key(KEY)}]}))
    with ServerThread(FakeEngine) as engine:

        def app():  # type: ignore[no-untyped-def]
            backend = FakeClusterBackend([make_model("demo"), make_model("cold")])
            backend.set_instances("demo", [ready_instance("demo", "demo-0", engine.url)])
            backend.add_model(make_model("broken"), error="missing from the store")
            settings = fast_settings(
                auth_enabled=True, api_keys_file=keys, queue_timeout_seconds=0.2,
                max_request_bytes=64 * 1024, access_log=False,
            )  # fmt: skip
            return create_app(backend, settings)

        with ServerThread(app) as gateway:
            yield gateway.url


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_no_input_makes_the_gateway_fail(case: schemathesis.Case, gateway_url: str) -> None:
    # Random model names only reach the 404 path; send every other body to the served
    # model, so generated parameters are also forwarded to an engine and relayed back.
    n = next(_cases)
    positive = case.meta is None or case.meta.generation.mode == GenerationMode.POSITIVE
    body = case.body
    if positive and isinstance(body, dict) and isinstance(body.get("model"), str) and n % 2:
        body["model"] = "demo"
    # The "broken" model answers 503 model_unavailable by design (documented); any other
    # 5xx is a failure.
    broken = isinstance(body, dict) and body.get("model") == "broken"
    case.call_and_validate(
        base_url=gateway_url,
        headers={"Authorization": f"Bearer {KEY}"},
        excluded_checks=[not_a_server_error] if broken else None,
    )


_cases = itertools.count()
