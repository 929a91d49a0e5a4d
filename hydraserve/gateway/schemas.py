"""OpenAI request and response schemas, as far as the gateway checks them.

The gateway validates what it must understand (``model``, ``stream``) and the documented
types and ranges of the common parameters, so a malformed request gets a 400 naming the
field before it costs an instance; it then forwards the client's original body, so engine
extensions it does not know (vLLM's ``top_k``, ``guided_json``, ...) still reach the engine.

Numbers and booleans are checked by JSON's rules, not coerced (no ``"true"`` for a boolean,
no ``false`` or ``"5"`` for an integer; ``5.0`` is an integer as in JSON Schema): the engine
receives the client's body as sent, so the gateway must not accept what it would read
differently from the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool

from hydraserve.api.models import SloAttainmentStatus


def _json_number(value: Any) -> Any:
    # Pydantic's lax mode would turn true into 1 and "5" into 5; JSON does not.
    if isinstance(value, bool | str | bytes):
        raise ValueError("Input should be a number")
    return value


JSONNumber = BeforeValidator(_json_number)
# Constraints go before the validator, so the JSON schema shows them as minimum/maximum.
Int = Annotated[int, JSONNumber]
Float = Annotated[float, JSONNumber]
NonNegativeInt = Annotated[int, Field(ge=0), JSONNumber]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0), JSONNumber]


class _OpenAIRequest(BaseModel):
    # Unknown fields are engine extensions: allowed and forwarded untouched.
    model_config = ConfigDict(extra="allow")

    model: Annotated[
        str,
        Field(min_length=1, max_length=256, description="A model name from GET /v1/models."),
    ]
    stream: StrictBool = Field(default=False, description="Answer with server-sent events.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: StrictBool | None = None


class _SamplingParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    max_tokens: NonNegativeInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0), JSONNumber] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0), JSONNumber] | None = None
    n: Annotated[int, Field(ge=1, le=128), JSONNumber] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: Int | None = None
    user: str | None = None
    logit_bias: dict[str, Float] | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_SamplingParams, _OpenAIRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(
        description="Text, a batch of texts, or token ids.", examples=["Once upon a time"]
    )
    echo: StrictBool | None = None
    logprobs: NonNegativeInt | None = None
    best_of: Annotated[int, Field(ge=1), JSONNumber] | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    """One part of a multi-part message (``text``, ``image_url``, ...)."""

    model_config = ConfigDict(extra="allow")
    type: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_SamplingParams, _OpenAIRequest):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: NonNegativeInt | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), JSONNumber] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


# --- responses the gateway writes itself --------------------------------------------------


class ModelStatus(BaseModel):
    """HydraServe's view of a model (an extension of the OpenAI model object)."""

    desired_replicas: int
    ready_instances: int
    starting_instances: int
    phase: str | None = Field(
        default=None, description="Cold, Starting, Serving, Consolidating or Failed."
    )
    error: str | None = None
    slo_attainment: SloAttainmentStatus | None = Field(
        default=None,
        description="Share of streaming requests that met the model's TTFT and TPOT SLOs "
        "over the gateway's window, cold and warm apart.",
    )


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    hydraserve: ModelStatus


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
