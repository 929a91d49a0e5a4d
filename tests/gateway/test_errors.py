"""Every error is in the OpenAI shape, with the status codes the decision notes give."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from hydraserve.backends.base import ModelView
from hydraserve.gateway.errors import validation_error
from tests.support.fakes import FakeClusterBackend, make_model

from .conftest import Harness, fast_settings

StartGateway = Callable[..., Awaitable[Harness]]


def assert_openai_error(body: dict[str, Any]) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return dict(error)


@pytest.fixture
async def gw(start_gateway: StartGateway) -> Harness:
    backend = FakeClusterBackend([make_model("m")])
    backend.add_model(make_model("broken"), error="no model in the store at /models/broken")
    return await start_gateway(backend, fast_settings(max_request_bytes=4096))


async def test_unknown_model_is_404_naming_the_model(gw: Harness) -> None:
    for path, body in [
        ("/v1/completions", {"model": "nope", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
    ]:
        response = await gw.client.post(path, json=body)
        assert response.status_code == 404
        error = assert_openai_error(response.json())
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "nope" in error["message"]
    response = await gw.client.get("/v1/models/nope")
    assert response.status_code == 404
    assert_openai_error(response.json())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": "m", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "n": 0}, "n"),
        ({"model": "m", "prompt": {"text": "x"}}, "prompt"),
        ({"model": "m", "prompt": "x", "stream": "maybe"}, "stream"),
        # JSON's types, not Python's coercions: the engine gets the body as sent.
        ({"model": "m", "prompt": "x", "stream": "true"}, "stream"),
        ({"model": "m", "prompt": "x", "n": True}, "n"),
        ({"model": "m", "prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"model": "m", "prompt": [1, True]}, "prompt"),
        ({"model": "m", "prompt": "x", "n": 1.5}, "n"),
    ],
)
async def test_malformed_completion_is_400_naming_the_field(
    gw: Harness, body: dict[str, Any], param: str
) -> None:
    response = await gw.client.post("/v1/completions", json=body)
    assert response.status_code == 400
    error = assert_openai_error(response.json())
    assert error["param"] == param
    assert param in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages.0.role"),
        ({"model": "m", "messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        ({"model": "m", "messages": "hi"}, "messages"),
    ],
)
async def test_malformed_chat_is_400_naming_the_field(
    gw: Harness, body: dict[str, Any], param: str
) -> None:
    response = await gw.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = assert_openai_error(response.json())
    assert error["param"] == param


async def test_integral_floats_are_integers_as_in_json_schema(gw: Harness) -> None:
    # 4.0 is an integer for JSON Schema (and schemathesis); the engine is not reached here
    # (no instance), the model is unknown, so a 404 shows validation passed.
    response = await gw.client.post(
        "/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 4.0}
    )
    assert response.status_code == 404


async def test_invalid_json_and_non_object_bodies_are_400(gw: Harness) -> None:
    bad_json = await gw.client.post(
        "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400
    assert "JSON" in assert_openai_error(bad_json.json())["message"]
    array = await gw.client.post("/v1/completions", json=[1, 2])
    assert array.status_code == 400
    assert_openai_error(array.json())
    empty = await gw.client.post("/v1/completions")
    assert empty.status_code == 400
    assert_openai_error(empty.json())


async def test_model_missing_from_the_store_answers_at_once_and_clearly(gw: Harness) -> None:
    response = await gw.client.post("/v1/completions", json={"model": "broken", "prompt": "x"})
    assert response.status_code == 503
    error = assert_openai_error(response.json())
    assert error["code"] == "model_unavailable"
    assert "no model in the store at /models/broken" in error["message"]
    assert "retry-after" not in response.headers  # retrying will not help
    assert gw.backend.scale_calls == []


async def test_declared_body_over_the_limit_is_413(gw: Harness) -> None:
    response = await gw.client.post("/v1/completions", json={"model": "m", "prompt": "x" * 10_000})
    assert response.status_code == 413
    assert assert_openai_error(response.json())["code"] == "request_too_large"


async def test_chunked_body_over_the_limit_is_413(gw: Harness) -> None:
    async def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "m", "prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = await gw.client.post(
        "/v1/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert_openai_error(response.json())


async def test_unknown_url_and_wrong_method_are_openai_errors(gw: Harness) -> None:
    missing = await gw.client.get("/v1/embeddingz")
    assert missing.status_code == 404
    assert assert_openai_error(missing.json())["code"] == "unknown_url"
    wrong = await gw.client.get("/v1/completions")
    assert wrong.status_code == 405
    assert_openai_error(wrong.json())


async def test_a_backend_failure_is_a_500_in_the_openai_shape(start_gateway: StartGateway) -> None:
    class Broken(FakeClusterBackend):
        def get_model(self, name: str) -> ModelView | None:
            raise RuntimeError("lost the API server")

    gw = await start_gateway(Broken([make_model("m")]))
    response = await gw.client.post("/v1/completions", json={"model": "m", "prompt": "x"})
    assert response.status_code == 500
    error = assert_openai_error(response.json())
    assert "lost the API server" not in error["message"]  # internals stay in the logs


def test_validation_error_counts_further_problems() -> None:
    error = validation_error(
        [
            {"type": "missing", "loc": ("body", "model"), "msg": "Field required"},
            {"type": "missing", "loc": ("body", "prompt"), "msg": "Field required"},
        ]
    )
    assert error.param == "model"
    assert "1 more problem" in error.message


def test_union_members_are_not_reported_as_fields() -> None:
    error = validation_error(
        [{"type": "string_type", "loc": ("body", "messages", 0, "content", "str"),
          "msg": "Input should be a valid string"}]
    )  # fmt: skip
    assert error.param == "messages.0.content"
