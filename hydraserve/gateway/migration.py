"""Moving an in-flight request to another instance, token-exactly (pure, no I/O).

When a pipelined instance is replaced by a standalone engine (consolidation), its running
requests move: the gateway aborts the old upstream stream and continues on the new
instance with a ``/v1/completions`` request whose prompt is the original prompt's token
ids plus the tokens generated so far (*recompute*), or the same request carrying
``kv_transfer_params`` so the new engine loads the already-computed KV instead of
recomputing it (*KV transfer*). A cost model picks one. The client sees one stream.

:class:`StreamStitcher` makes that exact:

* Upstream is asked for ``return_token_ids`` (the client gets those fields only if it
  asked for them), so the gateway knows the prompt's and every generated token's id.
* A chunk whose tokens produced no text yet (the detokenizer holds back an incomplete
  UTF-8 character) is held, not relayed, until text arrives. So what the client has is
  always a clean cut: every relayed token's text is complete. A continuation starts from
  there; held tokens are regenerated (identical under greedy sampling) and their text
  comes from the new engine. (A prompt ending mid-character would also make the new
  engine's detokenizer re-emit the whole prompt's text; clean cuts never do that.)
* Continuation chunks are re-labelled with the client's id, object and model; a chat
  request continues as a completion and its chunks are re-wrapped as chat deltas; usage
  counts the original prompt and every generated token.
* A non-streaming client's request is streamed upstream too, so it can move; the
  stitcher assembles the one JSON answer at the end.

Requests whose continuation could not be exact stay where they are
(:func:`pinned_reason`): several choices, logprobs, stop strings (the engine holds back
text that might start one), penalties over generated tokens, structured output, tools.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"

# vLLM's completions default when max_tokens is absent or null.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# "Up to the context window": vLLM clamps max_tokens to max_model_len - prompt length.
UNBOUNDED_MAX_TOKENS = 1 << 30

SAVE_KEY = "hydraserve_save"  # kv_transfer_params: save this request's KV if it is aborted
LOAD_KEY = "hydraserve_load"  # kv_transfer_params: load the KV saved under this key


class MigrationMethod(StrEnum):
    RECOMPUTE = "recompute"
    KV = "kv"


# --- which requests can move ---------------------------------------------------------------

# Body fields of the original request that do not carry over to a token-id completion.
_NOT_CARRIED = frozenset(
    {
        "prompt",
        "messages",
        "stream",
        "stream_options",
        "max_tokens",
        "max_completion_tokens",
        "min_tokens",
        "echo",
        "n",
        "best_of",
        "suffix",
        "return_token_ids",
        "kv_transfer_params",
        "logprobs",
        "top_logprobs",
        # chat-only: they shaped the prompt, which is now token ids
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "response_format",
        "chat_template",
        "chat_template_kwargs",
        "add_generation_prompt",
        "continue_final_message",
        "documents",
        "add_special_tokens",
        "mm_processor_kwargs",
        "include_reasoning",
        "reasoning_effort",
    }
)

# Fields that make a continuation differ from an unmigrated run when set.
_PINNING_FIELDS = (
    "stop",
    "bad_words",
    "logits_processors",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "guided_decoding_backend",
    "truncate_prompt_tokens",
    "prompt_logprobs",
    "suffix",
    "tools",
    "functions",
    "response_format",
)


def pinned_reason(endpoint: str, body: dict[str, Any]) -> str | None:
    """Why this request must finish on the instance it started on (None: it can move).

    The reason is a field name or a short fixed phrase (bounded: it labels a metric)."""
    if endpoint not in (COMPLETIONS, CHAT_COMPLETIONS):
        return "endpoint"
    for key in ("n", "best_of"):
        value = body.get(key)
        if value is not None and value != 1:
            return key
    if body.get("echo"):
        return "echo"
    if body.get("logprobs") not in (None, False) or body.get("top_logprobs"):
        return "logprobs"
    for key in _PINNING_FIELDS:
        value = body.get(key)
        if value in (None, [], "", {}):
            continue
        if key == "response_format" and isinstance(value, dict) and value.get("type") == "text":
            continue
        return key
    for key, neutral in (
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("repetition_penalty", 1),
    ):
        value = body.get(key)
        if value is not None and value != neutral:
            # vLLM applies these over generated tokens, which become prompt tokens.
            return key
    if body.get("tool_choice") not in (None, "none"):
        return "tool_choice"
    if endpoint == COMPLETIONS:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) > 1 and not isinstance(prompt[0], int):
            return "several_prompts"
    else:
        for message in body.get("messages") or []:
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") != "text" for p in content
            ):
                return "non_text_content"
    return None


# --- the cost model --------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationCosts:
    """Constants of the migration cost model (GatewaySettings carries them)."""

    kv_bytes_per_token: int | None  # layers × 2 × KV heads × head size × dtype bytes
    kv_bytes_per_s: float  # the link the KV crosses (shared memory on one node)
    kv_fixed_seconds: float  # save on abort + handshake, whatever the size
    prefill_tokens_per_s: float  # the new engine's prefill throughput


@dataclass(frozen=True)
class MigrationChoice:
    method: MigrationMethod
    tokens: int  # prompt + generated: what the new engine needs as context
    recompute_seconds: float
    kv_seconds: float | None  # None when KV transfer is impossible

    @property
    def reason(self) -> str:
        if self.kv_seconds is None:
            return "kv transfer not possible"
        return f"recompute {self.recompute_seconds:.4f}s vs kv {self.kv_seconds:.4f}s"


def choose_method(
    tokens: int, costs: MigrationCosts, *, kv_possible: bool, prefer: str = "auto"
) -> MigrationChoice:
    """Recompute the prefix (tokens ÷ prefill throughput) or move its KV (bytes ÷ link +
    a fixed cost), whichever is predicted faster; ``prefer`` forces one ("recompute",
    "kv"), though KV only where it is possible at all."""
    recompute = tokens / max(costs.prefill_tokens_per_s, 1e-9)
    kv: float | None = None
    if kv_possible and costs.kv_bytes_per_token:
        kv_bytes = tokens * costs.kv_bytes_per_token
        kv = costs.kv_fixed_seconds + kv_bytes / max(costs.kv_bytes_per_s, 1e-9)
    if kv is None or prefer == MigrationMethod.RECOMPUTE:
        method = MigrationMethod.RECOMPUTE
    elif prefer == MigrationMethod.KV:
        method = MigrationMethod.KV
    else:
        method = MigrationMethod.KV if kv < recompute else MigrationMethod.RECOMPUTE
    return MigrationChoice(method, tokens, recompute, kv)


@dataclass
class PrefillEstimator:
    """The engines' prefill throughput (tokens/s), learnt from observed first tokens: an
    exponentially weighted mean of prompt tokens ÷ time to the first token, over prompts
    long enough for the prefill to dominate; ``default`` until one is seen."""

    default: float
    weight: float = 0.2
    min_tokens: int = 32
    value: float | None = None

    def observe(self, prompt_tokens: int, seconds: float) -> None:
        if prompt_tokens < self.min_tokens or seconds <= 0:
            return
        rate = prompt_tokens / seconds
        self.value = (
            rate if self.value is None else (1 - self.weight) * self.value + (self.weight * rate)
        )

    @property
    def tokens_per_s(self) -> float:
        return self.value if self.value is not None else self.default


# --- stitching streams ---------------------------------------------------------------------


def _dumps(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def sse(data: Any) -> bytes:
    return b"data: " + _dumps(data) + b"\n\n"


@dataclass
class Relayed:
    """What one upstream event gave the client: bytes to send, token events in them."""

    data: bytes = b""
    token_events: int = 0


@dataclass
class _Leg:
    continuation: bool  # a /v1/completions continuation (else the client's own format)
    generated_before: int  # tokens relayed before this leg began
    method: MigrationMethod | None = None


@dataclass
class StreamStitcher:
    """Relays one request's upstream events across instances (see the module docstring).

    Feed it each upstream SSE event's ``data`` payload in order; at a move, call
    :meth:`continuation` for the next upstream request and keep feeding."""

    endpoint: str
    body: dict[str, Any]
    client_stream: bool
    prompt_ids: list[int] | None = None
    generated: list[int] = field(default_factory=list)
    finished: bool = False  # the terminal chunk (finish_reason) was relayed
    done: bool = False  # the stream ended ([DONE] relayed, or the answer assembled)
    error: dict[str, Any] | None = None  # an error the engine reported
    legs: list[_Leg] = field(default_factory=lambda: [_Leg(False, 0)])

    def __post_init__(self) -> None:
        self.chat = self.endpoint == CHAT_COMPLETIONS
        self.want_token_ids = bool(self.body.get("return_token_ids"))
        options = self.body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        self.want_usage = self.client_stream and bool(options.get("include_usage"))
        self._held: list[tuple[dict[str, Any], list[int], str]] = []
        self._ident: tuple[str, int, str] | None = None  # id, created, model
        self._fingerprint: str | None = None
        self._relayed_any = False
        self._usage: dict[str, Any] | None = None
        self._text: list[str] = []
        self._finish_reason: str | None = None
        self._stop_reason: Any = None

    # --- requests --------------------------------------------------------------------

    def upstream_body(self, save_key: str | None = None) -> bytes:
        """The first upstream request: the client's, streamed, with token ids."""
        body = dict(self.body)
        body["stream"] = True
        body["return_token_ids"] = True
        if not self.client_stream:
            body["stream_options"] = {"include_usage": True}
        if save_key is not None:
            body["kv_transfer_params"] = {SAVE_KEY: save_key}
        return _dumps(body)

    @property
    def context_tokens(self) -> int:
        """Tokens a continuation's engine needs as context (prompt + generated)."""
        return len(self.prompt_ids or []) + len(self.generated)

    def continuation(
        self,
        method: MigrationMethod,
        *,
        load_key: str | None = None,
        save_key: str | None = None,
    ) -> tuple[str, bytes]:
        """The request that continues this one on another instance: (endpoint, body).

        Drops what was held back (those tokens are generated again). Without a known
        prompt (nothing arrived yet) it is the original request again."""
        self._held.clear()
        if self.prompt_ids is None:
            self.legs.append(_Leg(False, 0, method))
            return self.endpoint, self.upstream_body(save_key)
        generated = len(self.generated)
        body = {k: v for k, v in self.body.items() if k not in _NOT_CARRIED}
        body["prompt"] = [*self.prompt_ids, *self.generated]
        body["stream"] = True
        body["return_token_ids"] = True
        limit = self._max_tokens()
        body["max_tokens"] = UNBOUNDED_MAX_TOKENS if limit is None else max(1, limit - generated)
        min_tokens = self.body.get("min_tokens")
        if isinstance(min_tokens, int) and min_tokens > 0:
            body["min_tokens"] = max(0, min_tokens - generated)
        body["stream_options"] = (
            {"include_usage": True} if not self.client_stream or self.want_usage else None
        )
        if body["stream_options"] is None:
            del body["stream_options"]
        params: dict[str, Any] = {}
        if load_key is not None:
            params[LOAD_KEY] = load_key
        if save_key is not None:
            params[SAVE_KEY] = save_key
        if params:
            body["kv_transfer_params"] = params
        self.legs.append(_Leg(True, generated, method))
        return COMPLETIONS, _dumps(body)

    def _max_tokens(self) -> int | None:
        if self.chat:
            value = self.body.get("max_completion_tokens")
            if value is None:
                value = self.body.get("max_tokens")
            return value if isinstance(value, int) else None
        value = self.body.get("max_tokens")
        return value if isinstance(value, int) else COMPLETIONS_DEFAULT_MAX_TOKENS

    # --- events --------------------------------------------------------------------------

    def feed(self, payload: bytes) -> Relayed:
        """One upstream event's data (``[DONE]`` or a JSON chunk) -> what to relay."""
        payload = payload.strip()
        if payload == b"[DONE]":
            return self._on_done()
        try:
            chunk = json.loads(payload)
        except ValueError:
            return Relayed(b"data: " + payload + b"\n\n" if self.client_stream else b"")
        if not isinstance(chunk, dict):
            return Relayed()
        if "error" in chunk and "choices" not in chunk:
            self.error = chunk
            return Relayed(sse(chunk) if self.client_stream else b"")
        return self._on_chunk(chunk)

    def _on_done(self) -> Relayed:
        out = self._flush()
        self.done = True
        if not self.client_stream:
            return Relayed(b"", out.token_events)
        if self.want_usage and self._usage is None and self.finished:
            out.data += sse(self._usage_chunk(self._fallback_usage()))
        out.data += b"data: [DONE]\n\n"
        return out

    def finish_early(self) -> Relayed:
        """End the stream ourselves: the terminal chunk was relayed but the engine's tail
        (usage, [DONE]) was lost to a move."""
        return self._on_done()

    @property
    def _leg(self) -> _Leg:
        return self.legs[-1]

    def _on_chunk(self, chunk: dict[str, Any]) -> Relayed:
        leg = self._leg
        if self._ident is None:
            self._ident = (
                str(chunk.get("id", "")),
                int(chunk.get("created") or 0),
                str(chunk.get("model", "")),
            )
        if chunk.get("system_fingerprint"):
            self._fingerprint = chunk["system_fingerprint"]
        choices = chunk.get("choices") or []
        usage = chunk.get("usage")
        if not choices:
            if isinstance(usage, dict):
                self._usage = self._total_usage(usage)
                if not self.want_usage:
                    return Relayed()
                return Relayed(self._flush().data + sse(self._usage_chunk(self._usage)))
            return Relayed(sse(self._relabel(chunk)) if self.client_stream else b"")
        choice = choices[0]
        ids = [int(t) for t in choice.get("token_ids") or []]
        if self.prompt_ids is None:
            prompt = chunk.get("prompt_token_ids") if self.chat and not leg.continuation else None
            prompt = prompt or choice.get("prompt_token_ids")
            if prompt:
                self.prompt_ids = [int(t) for t in prompt]
        if leg.continuation or not self.chat:
            text = choice.get("text") or ""
        else:
            text = (choice.get("delta") or {}).get("content") or ""
        finish = choice.get("finish_reason")
        converted = self._convert(chunk, choice, text, ids, finish)
        if isinstance(usage, dict):
            converted["usage"] = self._total_usage(usage)
        if ids and not text and finish is None:
            # Its text is held back by the detokenizer: not a clean cut (see the module).
            self._held.append((converted, ids, text))
            return Relayed()
        self._held.append((converted, ids, text))
        if finish is not None:
            self.finished = True
            self._finish_reason = finish
            self._stop_reason = choice.get("stop_reason")
        return self._flush()

    def _flush(self) -> Relayed:
        out = Relayed()
        for converted, ids, text in self._held:
            self.generated.extend(ids)
            if ids:
                out.token_events += 1
            self._text.append(text)
            self._relayed_any = True
            if self.client_stream:
                out.data += sse(converted)
        self._held.clear()
        return out

    # --- shapes --------------------------------------------------------------------------

    def _relabel(self, chunk: dict[str, Any]) -> dict[str, Any]:
        out = dict(chunk)
        if self._ident is not None:
            out["id"], out["created"], out["model"] = self._ident
        return out

    def _convert(
        self,
        chunk: dict[str, Any],
        choice: dict[str, Any],
        text: str,
        ids: list[int],
        finish: str | None,
    ) -> dict[str, Any]:
        """An upstream chunk in the client's shape (its own format, or a continuation's
        completion chunk re-wrapped), token-id fields only if the client asked."""
        first = not self._relayed_any and not self._held
        out: dict[str, Any]
        if not self._leg.continuation:
            out = self._relabel(chunk)
            new_choice = dict(choice)
            if self.chat:
                if "prompt_token_ids" in out and not self.want_token_ids:
                    out["prompt_token_ids"] = None
            elif "prompt_token_ids" in new_choice:
                new_choice["prompt_token_ids"] = (
                    new_choice["prompt_token_ids"] if self.want_token_ids else None
                )
            if "token_ids" in new_choice and not self.want_token_ids:
                new_choice["token_ids"] = None
            out["choices"] = [new_choice]
            return out
        ident, created, model = self._ident or ("", 0, "")
        token_ids = ids if self.want_token_ids else None
        if self.chat:
            chat_choice: dict[str, Any] = {
                "index": 0,
                "delta": {"content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            if finish is not None:
                chat_choice["stop_reason"] = choice.get("stop_reason")
            chat_choice["token_ids"] = token_ids
            out = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [chat_choice],
            }
        else:
            prompt = self.prompt_ids if (first and self.want_token_ids) else None
            out = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": choice.get("stop_reason"),
                        "prompt_token_ids": prompt,
                        "token_ids": token_ids,
                    }
                ],
            }
        if chunk.get("system_fingerprint"):
            out["system_fingerprint"] = chunk["system_fingerprint"]
        return out

    def _total_usage(self, usage: dict[str, Any]) -> dict[str, Any]:
        """Usage over the whole request: the original prompt, every generated token."""
        leg = self._leg
        if not leg.continuation and leg.generated_before == 0:
            return usage
        prompt = len(self.prompt_ids or []) or int(usage.get("prompt_tokens") or 0)
        completion = leg.generated_before + int(usage.get("completion_tokens") or 0)
        out = dict(usage)
        out.update(prompt_tokens=prompt, completion_tokens=completion)
        out["total_tokens"] = prompt + completion
        if "prompt_tokens_details" in out:
            out["prompt_tokens_details"] = None
        return out

    def _fallback_usage(self) -> dict[str, Any]:
        prompt = len(self.prompt_ids or [])
        completion = len(self.generated)
        return {
            "prompt_tokens": prompt,
            "total_tokens": prompt + completion,
            "completion_tokens": completion,
        }

    def _usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        ident, created, model = self._ident or ("", 0, "")
        out: dict[str, Any] = {
            "id": ident,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        if self._fingerprint:
            out["system_fingerprint"] = self._fingerprint
        return out

    # --- non-streaming clients ---------------------------------------------------------

    def final_body(self) -> bytes:
        """The assembled answer for a client that did not stream (after ``done``)."""
        ident, created, model = self._ident or ("", 0, "")
        usage = self._usage or self._fallback_usage()
        text = "".join(self._text)
        token_ids = list(self.generated) if self.want_token_ids else None
        prompt_ids = self.prompt_ids if self.want_token_ids else None
        if self.chat:
            answer: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {
                            "role": "assistant",
                            "content": text,
                            "refusal": None,
                            "annotations": None,
                            "audio": None,
                            "function_call": None,
                            "reasoning": None,
                        },
                        "logprobs": None,
                        "finish_reason": self._finish_reason,
                        "stop_reason": self._stop_reason,
                        "token_ids": token_ids,
                    }
                ],
                "system_fingerprint": self._fingerprint,
                "usage": usage,
                "prompt_logprobs": None,
                "prompt_token_ids": prompt_ids,
            }
        else:
            answer = {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": self._finish_reason,
                        "stop_reason": self._stop_reason,
                        "token_ids": token_ids,
                        "prompt_logprobs": None,
                        "prompt_token_ids": prompt_ids,
                    }
                ],
                "system_fingerprint": self._fingerprint,
                "usage": usage,
            }
        return _dumps(answer)
