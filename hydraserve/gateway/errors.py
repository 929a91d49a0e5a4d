"""Errors in the OpenAI shape: ``{"error": {"message", "type", "param", "code"}}``.

Every error the gateway answers — its own, the framework's (validation, unknown route,
wrong method) and unexpected ones — goes through :func:`error_response`, so clients that
parse OpenAI errors (the official SDKs) always find the same structure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from hydraserve.logs import get_logger

log = get_logger("gateway")

# Error types (the OpenAI ``type`` field); the HTTP status is what SDKs dispatch on.
INVALID_REQUEST = "invalid_request_error"
AUTHENTICATION = "authentication_error"
PERMISSION = "permission_error"
NOT_FOUND = "not_found_error"
RATE_LIMIT = "rate_limit_error"
SERVICE_UNAVAILABLE = "service_unavailable_error"
UPSTREAM = "upstream_error"
INTERNAL = "internal_error"


class GatewayError(Exception):
    """An error answered to the client in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str,
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.code, self.param)


def error_body(
    message: str, type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: GatewayError, extra_headers: Mapping[str, str] | None = None) -> Response:
    headers = {**error.headers, **(extra_headers or {})}
    return Response(
        json.dumps(error.body()).encode(),
        status_code=error.status,
        media_type="application/json",
        headers=headers,
    )


# --- constructors for the errors the gateway answers ----------------------------------


def model_not_found(model: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model '{model}' does not exist. GET /v1/models lists the models you can use.",
        type=INVALID_REQUEST,
        code="model_not_found",
        param="model",
    )


def ambiguous_model(model: str, ids: Sequence[str]) -> GatewayError:
    # 400, not 404: the name exists for this caller, it just does not say which one.
    listed = ", ".join(f"'{i}'" for i in ids)
    return GatewayError(
        400,
        f"The model name '{model}' is ambiguous: {len(ids)} models you can use have it. "
        f"Name one as namespace/name: {listed}.",
        type=INVALID_REQUEST,
        code="ambiguous_model",
        param="model",
    )


def model_unavailable(model: str, reason: str) -> GatewayError:
    # Not retryable soon (no Retry-After): an operator has to fix the model first.
    return GatewayError(
        503,
        f"The model '{model}' cannot start: {reason}",
        type=SERVICE_UNAVAILABLE,
        code="model_unavailable",
        param="model",
    )


def queue_full(model: str, capacity: int, retry_after: int) -> GatewayError:
    return GatewayError(
        429,
        f"Too many requests are waiting for model '{model}' (queue of {capacity} is full). "
        f"Retry after {retry_after} s.",
        type=RATE_LIMIT,
        code="queue_full",
        headers={"Retry-After": str(retry_after)},
    )


def wait_timeout(model: str, waited: float, retry_after: int, detail: str = "") -> GatewayError:
    suffix = f" ({detail})" if detail else ""
    return GatewayError(
        503,
        f"Model '{model}' had no instance ready within {waited:.1f} s{suffix}. "
        f"It is probably still starting; retry after {retry_after} s.",
        type=SERVICE_UNAVAILABLE,
        code="cold_start_timeout",
        headers={"Retry-After": str(retry_after)},
    )


def no_reachable_instance(model: str, attempts: int, retry_after: int) -> GatewayError:
    return GatewayError(
        503,
        f"No instance of model '{model}' accepted a connection ({attempts} tried). "
        f"Retry after {retry_after} s.",
        type=SERVICE_UNAVAILABLE,
        code="no_reachable_instance",
        headers={"Retry-After": str(retry_after)},
    )


def upstream_failed(model: str, detail: str, status: int = 502) -> GatewayError:
    return GatewayError(
        status,
        f"The instance serving model '{model}' failed: {detail}",
        type=UPSTREAM,
        code="upstream_error" if status == 502 else "upstream_timeout",
    )


def request_too_large(limit: int) -> GatewayError:
    return GatewayError(
        413,
        f"Request body is larger than the limit of {limit} bytes.",
        type=INVALID_REQUEST,
        code="request_too_large",
    )


# --- framework errors -------------------------------------------------------------------


def _param_of(loc: Sequence[Any]) -> str | None:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    # Pydantic puts the union member's type name into the location; it is not a field.
    parts = [p for p in parts if not _is_type_tag(p)]
    return ".".join(parts) or None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def _is_type_tag(part: str) -> bool:
    """Union members (``str``, ``list[int]``, ``TextPart``, ``function-after[...]``) that
    pydantic puts into error locations; the gateway's field names are all snake_case."""
    return part in _TYPE_TAGS or "[" in part or "-" in part or part[:1].isupper()


def validation_error(errors: Sequence[Mapping[str, Any]]) -> GatewayError:
    """One 400 naming the first offending field (and how many more there are)."""
    if not errors:
        return GatewayError(400, "Invalid request.", type=INVALID_REQUEST, code="invalid_request")
    first = errors[0]
    code = str(first.get("type", "invalid_value"))
    param = _param_of(first.get("loc", ()))
    if code == "json_invalid":
        message = f"The request body is not valid JSON: {first.get('msg', '')}"
        param = None
    elif param is None and code in ("model_attributes_type", "model_type", "dict_type", "missing"):
        message = "The request body must be a JSON object (Content-Type: application/json)."
    elif param is None:
        message = f"Invalid request body: {first.get('msg', 'invalid value')}"
    elif code == "missing":
        message = f"Missing required parameter: '{param}'."
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid value')}"
    others = len(errors) - 1
    if others:
        message += f" ({others} more problem{'s' if others > 1 else ''} in the request)"
    return GatewayError(400, message, type=INVALID_REQUEST, code=code, param=param)


ErrorHook = Callable[[Request, GatewayError], None]


def install_error_handlers(app: FastAPI, on_error: ErrorHook | None = None) -> None:
    """Make every error the app can answer use the OpenAI shape; ``on_error`` sees each
    one (metrics, access log)."""

    def answer(
        request: Request, error: GatewayError, headers: Mapping[str, str] | None = None
    ) -> Response:
        if on_error is not None:
            on_error(request, error)
        return error_response(error, headers)

    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return answer(request, exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return answer(request, validation_error(list(exc.errors())))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if isinstance(exc.__cause__, GatewayError):
            # FastAPI wraps errors raised while it reads the body (the size limit) in a 400.
            return answer(request, exc.__cause__)
        if exc.status_code == 404:
            error = GatewayError(
                404,
                f"Unknown URL: {request.method} {request.url.path}",
                type=NOT_FOUND,
                code="unknown_url",
            )
        elif exc.status_code == 405:
            error = GatewayError(
                405,
                f"Method {request.method} is not allowed on {request.url.path}",
                type=INVALID_REQUEST,
                code="method_not_allowed",
            )
        else:
            error = GatewayError(
                exc.status_code,
                str(exc.detail),
                type=INVALID_REQUEST if exc.status_code < 500 else INTERNAL,
            )
        return answer(request, error, exc.headers)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        log.error("request.unexpected_error", path=request.url.path, error=repr(exc))
        return answer(
            request,
            GatewayError(500, "Internal error in the gateway.", type=INTERNAL, code="internal"),
        )

    app.add_exception_handler(GatewayError, on_gateway_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
