"""OpenAI request and response schemas, as far as the gateway checks them.

The gateway validates what it must understand (``model``, ``stream``) and the documented
types and ranges of the common parameters, so a malformed request gets a 400 naming the
field before it costs an instance; it then forwards the client's original body, so engine
extensions it does not know (vLLM's ``top_k``, ``guided_json``, ...) still reach the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

NonNegativeInt = Annotated[int, Field(ge=0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _OpenAIRequest(BaseModel):
    # Unknown fields are engine extensions: allowed and forwarded untouched.
    model_config = ConfigDict(extra="allow")

    model: Annotated[
        str,
        Field(min_length=1, max_length=256, description="A model name from GET /v1/models."),
    ]
    stream: bool = Field(default=False, description="Answer with server-sent events.")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool | None = None


class _SamplingParams(BaseModel):
    model_config = ConfigDict(extra="allow")

    max_tokens: NonNegativeInt | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | list[str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    seed: int | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    stream_options: StreamOptions | None = None


class CompletionRequest(_SamplingParams, _OpenAIRequest):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="Text, a batch of texts, or token ids.", examples=["Once upon a time"]
    )
    echo: bool | None = None
    logprobs: NonNegativeInt | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None
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
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


# --- responses the gateway writes itself --------------------------------------------------


class ModelStatus(BaseModel):
    """HydraServe's view of a model (an extension of the OpenAI model object)."""

    desired_replicas: int
    ready_instances: int
    starting_instances: int
    error: str | None = None


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
