"""Test doubles for the gateway: an in-memory cluster backend and a fast fake engine.

Used by the gateway's tests and its benchmark, and usable by anyone who needs a gateway
without engines: :class:`FakeClusterBackend` implements ``ClusterBackend`` in memory
(optionally "starting" instances after a delay, with cold-start stage timings) and
:class:`FakeEngine` is an OpenAI-compatible server in plain ASGI that answers in
microseconds, with knobs for delays and failures. :func:`serve_asgi` and
:class:`ServerThread` run any ASGI app on a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import uvicorn
from starlette.types import Message, Receive, Scope, Send

from hydraserve.api.models import ServerlessModel, SloAttainmentStatus, StageTiming
from hydraserve.backends.base import ClusterBackend, InstancePhase, InstanceView, ModelView

# --- the cluster ------------------------------------------------------------------------


def make_model(
    name: str,
    *,
    min_replicas: int = 0,
    max_replicas: int = 4,
    keep_alive_seconds: float = 30.0,
    target_concurrency: int = 8,
    uri: str | None = None,
    slo: dict[str, float] | None = None,
    namespace: str = "default",
) -> ServerlessModel:
    spec: dict[str, Any] = {
        "source": {"uri": uri or f"/models/{name}"},
        "scaling": {
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "keepAliveSeconds": keep_alive_seconds,
            "targetConcurrency": target_concurrency,
        },
    }
    if slo is not None:
        spec["slo"] = slo
    metadata = {"name": name, "namespace": namespace}
    return ServerlessModel.model_validate({"metadata": metadata, "spec": spec})


def ready_instance(model: str, name: str, endpoint: str, **fields: Any) -> InstanceView:
    now = time.time()
    return InstanceView(
        name=name,
        model=model,
        pp=1,
        phase=InstancePhase.READY,
        endpoint=endpoint,
        started_at=now,
        ready_at=now,
        **fields,
    )


# Shares of a simulated cold start, in the order the worker goes through them.
SIMULATED_STAGES = (
    ("fetch", 0.0, 0.6),
    ("imports", 0.0, 0.5),
    ("weight_load", 0.5, 0.8),
    ("engine_init", 0.5, 0.95),
    ("ready", 0.95, 1.0),
)


class FakeClusterBackend(ClusterBackend):
    """``ClusterBackend`` in memory. With ``endpoint_for`` it acts like a control plane:
    ``scale`` starts instances (Starting, then Ready after ``cold_start_seconds``, with
    stage timings) or removes them; without it, tests set instances by hand. Call it
    from the event loop that runs the gateway.

    Models are keyed by name, as the real backends key them; with ``qualified_keys`` by
    ``namespace/name`` instead, so two namespaces may each have a model of one name."""

    def __init__(
        self,
        models: Iterable[ServerlessModel] = (),
        *,
        endpoint_for: Callable[[str, int], str] | None = None,
        cold_start_seconds: float = 0.0,
        qualified_keys: bool = False,
    ) -> None:
        self.endpoint_for = endpoint_for
        self.qualified_keys = qualified_keys
        self.cold_start_seconds = cold_start_seconds
        self.fail_starts_with: str | None = None  # the next started instances fail so
        self.scale_calls: list[tuple[str, int]] = []
        self.slo_reports: dict[str, SloAttainmentStatus] = {}  # what the gateway reported
        self._views: dict[str, ModelView] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._ordinal: dict[str, int] = {}
        self._starting: set[asyncio.Task[None]] = set()
        for model in models:
            self.add_model(model)

    # --- test controls --------------------------------------------------------------

    def add_model(
        self,
        model: ServerlessModel,
        *,
        instances: Sequence[InstanceView] = (),
        desired_replicas: int | None = None,
        error: str | None = None,
    ) -> None:
        desired = len(instances) if desired_replicas is None else desired_replicas
        key = self.key_of(model)
        self._views[key] = ModelView(model, desired, tuple(instances), error)
        self._notify(key)

    def key_of(self, model: ServerlessModel) -> str:
        meta = model.metadata
        return f"{meta.namespace}/{meta.name}" if self.qualified_keys else meta.name

    def remove_model(self, name: str) -> None:
        self._views.pop(name, None)
        self._notify(name)

    def set_instances(self, name: str, instances: Sequence[InstanceView]) -> None:
        self._views[name] = replace(self._views[name], instances=tuple(instances))
        self._notify(name)

    def set_error(self, name: str, error: str | None) -> None:
        self._views[name] = replace(self._views[name], error=error)
        self._notify(name)

    # --- ClusterBackend ---------------------------------------------------------------

    def list_models(self) -> list[ModelView]:
        return list(self._views.values())

    def get_model(self, name: str) -> ModelView | None:
        return self._views.get(name)

    async def scale(self, name: str, replicas: int) -> None:
        self.scale_calls.append((name, replicas))
        view = self._views.get(name)
        if view is None:
            return
        instances = list(view.instances)
        if self.endpoint_for is not None:
            live = [i for i in instances if i.phase != InstancePhase.FAILED]
            while len(live) > replicas:  # newest first
                instances.remove(live.pop())
            for _ in range(replicas - len(live)):
                instances.append(self._start_instance(name))
        self._views[name] = replace(view, desired_replicas=replicas, instances=tuple(instances))
        self._notify(name)

    async def report_slo_attainment(self, name: str, attainment: SloAttainmentStatus) -> None:
        self.slo_reports[name] = attainment

    async def wait_for_change(self, name: str, timeout: float) -> None:
        event = self._changed.setdefault(name, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def close(self) -> None:
        for task in list(self._starting):
            task.cancel()
        await asyncio.gather(*self._starting, return_exceptions=True)

    # --- simulated instances ------------------------------------------------------------

    def _start_instance(self, model: str) -> InstanceView:
        ordinal = self._ordinal.get(model, 0)
        self._ordinal[model] = ordinal + 1
        instance = InstanceView(
            name=f"{model}-{ordinal}",
            model=model,
            pp=1,
            phase=InstancePhase.STARTING,
            started_at=time.time(),
        )
        task = asyncio.get_running_loop().create_task(self._become_ready(instance, ordinal))
        self._starting.add(task)
        task.add_done_callback(self._starting.discard)
        return instance

    async def _become_ready(self, instance: InstanceView, ordinal: int) -> None:
        await asyncio.sleep(self.cold_start_seconds)
        view = self._views.get(instance.model)
        if view is None or instance.name not in {i.name for i in view.instances}:
            return  # scaled away while starting
        assert self.endpoint_for is not None
        seconds = self.cold_start_seconds
        if self.fail_starts_with is not None:
            done = replace(instance, phase=InstancePhase.FAILED, error=self.fail_starts_with)
        else:
            done = replace(
                instance,
                phase=InstancePhase.READY,
                endpoint=self.endpoint_for(instance.model, ordinal),
                ready_at=time.time(),
                cold_start=tuple(
                    StageTiming(stage=stage, start=a * seconds, end=b * seconds)
                    for stage, a, b in SIMULATED_STAGES
                ),
            )
        instances = tuple(done if i.name == instance.name else i for i in view.instances)
        self._views[instance.model] = replace(view, instances=instances)
        self._notify(instance.model)

    def _notify(self, name: str) -> None:
        event = self._changed.pop(name, None)
        if event is not None:
            event.set()


# --- the engine ---------------------------------------------------------------------------


@dataclass
class FakeEngineBehaviour:
    """How :class:`FakeEngine` answers; tests change it while the engine runs."""

    name: str = "fake-engine"
    default_tokens: int = 8
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    fail_status: int | None = None  # answer every request with this HTTP error
    break_after_tokens: int | None = None  # streams: drop the connection after N tokens
    # streams: seconds between sending [DONE] and ending the response (a real server's
    # last chunk can trail the event the client stops at)
    done_linger: float = 0.0


@dataclass
class FakeEngineStats:
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    active: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    keep_bodies: bool = True


class _DisconnectedError(Exception):
    pass


class FakeEngine:
    """An OpenAI-compatible engine in plain ASGI: ``/health``, ``/v1/models``,
    ``/v1/completions``, ``/v1/chat/completions`` (JSON and SSE). Output is ``tok0 tok1
    ...``: ``max_tokens`` (or ``default_tokens``) tokens per choice, ``n`` choices."""

    def __init__(self, behaviour: FakeEngineBehaviour | None = None) -> None:
        self.behaviour = behaviour or FakeEngineBehaviour()
        self.stats = FakeEngineStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = await _route_or_answer(scope, receive, send)
        if route is None:
            return
        method, path = route
        if method == "GET" and path == "/v1/models":
            body = {"object": "list", "data": [{"id": "fake", "object": "model"}]}
            await _send_json(send, 200, json.dumps(body).encode())
        elif method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            await self._complete(scope, receive, send, chat=path.endswith("chat/completions"))
        else:
            await _send_json(send, 404, b'{"error": {"message": "not found"}}')

    async def _complete(self, scope: Scope, receive: Receive, send: Send, *, chat: bool) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        stats, behaviour = self.stats, self.behaviour
        stats.requests += 1
        body = json.loads(raw)
        if stats.keep_bodies:
            stats.bodies.append(body)
            stats.headers.append({k.decode(): v.decode() for k, v in scope["headers"]})
        if behaviour.fail_status is not None:
            error = {
                "error": {
                    "message": f"injected failure by {behaviour.name}",
                    "type": "BadRequestError",
                    "param": None,
                    "code": behaviour.fail_status,
                }
            }
            await _send_json(send, behaviour.fail_status, json.dumps(error).encode())
            return
        stats.active += 1
        try:
            if body.get("stream"):
                await self._stream(body, receive, send, chat=chat)
            else:
                await self._whole(body, receive, send, chat=chat)
            stats.completed += 1
        except _DisconnectedError:
            stats.disconnected += 1
        finally:
            stats.active -= 1

    def _plan(self, body: dict[str, Any]) -> tuple[int, int]:
        max_tokens = body.get("max_tokens") or body.get("max_completion_tokens")
        tokens = max_tokens if isinstance(max_tokens, int) else self.behaviour.default_tokens
        n = body.get("n") if isinstance(body.get("n"), int) else 1
        return max(0, min(tokens, 4096)), max(1, min(n or 1, 128))

    async def _whole(
        self, body: dict[str, Any], receive: Receive, send: Send, *, chat: bool
    ) -> None:
        tokens, n = self._plan(body)
        delay = self.behaviour.first_token_delay + self.behaviour.token_delay * max(0, tokens - 1)
        if delay > 0:
            await _sleep_unless_disconnected(delay, receive)
        text = "".join(f"tok{i} " for i in range(tokens))
        choices: list[dict[str, Any]] = []
        for index in range(n):
            if chat:
                message = {"role": "assistant", "content": text}
                choices.append({"index": index, "message": message, "finish_reason": "length"})
            else:
                choices.append(
                    {"index": index, "text": text, "logprobs": None, "finish_reason": "length"}
                )
        answer = {
            "id": f"cmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "system_fingerprint": self.behaviour.name,
            "choices": choices,
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": tokens * n,
                "total_tokens": 3 + tokens * n,
            },
        }
        await _send_json(send, 200, json.dumps(answer).encode())

    async def _stream(
        self, body: dict[str, Any], receive: Receive, send: Send, *, chat: bool
    ) -> None:
        tokens, n = self._plan(body)
        behaviour = self.behaviour
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        created, ident = int(time.time()), f"cmpl-{uuid.uuid4().hex[:12]}"
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index: int, text: str | None, finish: str | None) -> bytes:
            if chat:
                delta = {} if text is None else {"role": "assistant", "content": text}
                choice: dict[str, Any] = {"index": index, "delta": delta, "finish_reason": finish}
            else:
                choice = {
                    "index": index,
                    "text": text or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            event = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": body.get("model", "fake"),
                "choices": [choice],
            }
            return b"data: " + json.dumps(event).encode() + b"\n\n"

        if behaviour.first_token_delay > 0:
            await _sleep_unless_disconnected(behaviour.first_token_delay, receive)
        for token in range(tokens):
            if token and behaviour.token_delay > 0:
                await _sleep_unless_disconnected(behaviour.token_delay, receive)
            if behaviour.break_after_tokens is not None and token >= behaviour.break_after_tokens:
                # Half an event, then the connection drops: what a crashing engine does.
                await send(
                    {"type": "http.response.body", "body": b'data: {"id": "cm', "more_body": True}
                )
                raise RuntimeError("fake engine crashed mid-stream")
            events = b"".join(chunk(i, f"tok{token} ", None) for i in range(n))
            await send({"type": "http.response.body", "body": events, "more_body": True})
        tail = b"".join(chunk(i, None, "length") for i in range(n))
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):
            usage: dict[str, Any] = {
                "id": ident,
                "object": kind,
                "created": created,
                "model": body.get("model"),
                "choices": [],
                "usage": {
                    "prompt_tokens": 3,
                    "completion_tokens": tokens * n,
                    "total_tokens": 3 + tokens * n,
                },
            }
            tail += b"data: " + json.dumps(usage).encode() + b"\n\n"
        tail += b"data: [DONE]\n\n"
        if behaviour.done_linger:
            await send({"type": "http.response.body", "body": tail, "more_body": True})
            await asyncio.sleep(behaviour.done_linger)
            tail = b""
        await send({"type": "http.response.body", "body": tail, "more_body": False})


# --- a deterministic language model --------------------------------------------------------


@dataclass
class FakeLMBehaviour:
    """How :class:`FakeLMEngine` answers; tests change it while the engine runs."""

    name: str = "fake-lm"
    vocab: int = 97
    eos: int | None = None  # a token that ends generation (None: only max_tokens does)
    incomplete_every: int = 5  # tokens t with t % this == 0 carry half a character
    first_token_delay: float = 0.0
    token_delay: float = 0.0
    max_model_len: int = 512
    break_after_tokens: int | None = None  # streams: crash after N tokens (half an event)


@dataclass
class FakeLMStats:
    requests: int = 0
    completed: int = 0
    disconnected: int = 0
    active: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    tokens_sent: int = 0


class FakeLMEngine:
    """A deterministic stand-in for a vLLM engine (``/v1/completions`` and
    ``/v1/chat/completions``, JSON and SSE, vLLM's chunk shapes incl. ``return_token_ids``).

    Its "model" is greedy decoding of a fixed function: the next token depends on the whole
    context, so a request continued on another engine from its prompt and generated token
    ids yields exactly the tokens an unmoved run would. Its "tokenizer" maps each character
    to a token and each token ``t`` to the text ``<t>``; tokens with ``t % incomplete_every
    == 0`` are half a character (their text comes out with the next token), and a prompt
    ending in one makes the detokenizer re-emit the whole prompt's text first, as
    ``tokenizers``' ``DecodeStream`` does. Both are what migration must get right."""

    def __init__(self, behaviour: FakeLMBehaviour | None = None) -> None:
        self.behaviour = behaviour or FakeLMBehaviour()
        self.stats = FakeLMStats()

    # --- the model ---------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        vocab = self.behaviour.vocab
        return [2 + ord(c) % (vocab - 2) for c in text]

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        text = "".join(f"{m.get('role')}: {m.get('content')}\n" for m in messages)
        return self.tokenize(text + "assistant: ")

    def next_token(self, context: list[int]) -> int:
        last = context[-1] if context else 3
        before = context[-2] if len(context) > 1 else 7
        return (last * 31 + before * 17 + len(context) * 13) % self.behaviour.vocab

    def incomplete(self, token: int) -> bool:
        return token % self.behaviour.incomplete_every == 0

    def generate(self, prompt: list[int], max_tokens: int, ignore_eos: bool) -> list[int]:
        context, out = list(prompt), []
        for _ in range(max_tokens):
            token = self.next_token(context)
            out.append(token)
            context.append(token)
            if token == self.behaviour.eos and not ignore_eos:
                break
        return out

    def detokenize_stream(self, prompt: list[int], tokens: list[int]) -> list[str]:
        """Text emitted per generated token, DecodeStream-style (see the class doc)."""
        pending = list(prompt) if prompt and self.incomplete(prompt[-1]) else []
        texts = []
        for token in tokens:
            pending.append(token)
            if self.incomplete(token):
                texts.append("")
                continue
            texts.append("".join(f"<{t}>" for t in pending))
            pending = []
        return texts

    # --- HTTP ----------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = await _route_or_answer(scope, receive, send)
        if route is None:
            return
        method, path = route
        if method == "POST" and path in ("/v1/completions", "/v1/chat/completions"):
            await self._complete(receive, send, path)
        else:
            await _send_json(send, 404, b'{"error": {"message": "not found"}}')

    def answer(self, path: str, body: dict[str, Any]) -> FakeLMAnswer:
        """What the engine generates for a request (pure: the tests' reference)."""
        chat = path.endswith("chat/completions")
        if chat:
            prompt = self.chat_prompt(body["messages"])
        elif isinstance(body.get("prompt"), list):
            prompt = [int(t) for t in body["prompt"]]
        else:
            prompt = self.tokenize(str(body.get("prompt", "")))
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if limit is None and not chat:
            limit = 16
        room = self.behaviour.max_model_len - len(prompt)
        max_tokens = room if limit is None else min(int(limit), room)
        tokens = self.generate(prompt, max_tokens, bool(body.get("ignore_eos")))
        texts = self.detokenize_stream(prompt, tokens)
        finish = "length"
        if tokens and tokens[-1] == self.behaviour.eos and not body.get("ignore_eos"):
            finish = "stop"
        return FakeLMAnswer(chat, prompt, tokens, texts, finish)

    def stream_chunks(self, body: dict[str, Any], answer: FakeLMAnswer) -> list[dict[str, Any]]:
        """The SSE chunks (before ``[DONE]``) vLLM would send for ``answer``."""
        chat, prompt, tokens = answer.chat, answer.prompt, answer.tokens
        ids = bool(body.get("return_token_ids"))
        options = body.get("stream_options") or {}
        usage_wanted = bool(options.get("include_usage"))
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}"
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def head(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return {
                "id": ident,
                "object": kind,
                "created": created,
                "model": body.get("model"),
                "choices": choices,
            }

        chunks = []
        if chat:
            role = head([{"index": 0, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])  # fmt: skip
            role["prompt_token_ids"] = prompt if ids else None
            role["prompt_text"] = None
            chunks.append(role)
        for index, (token, text) in enumerate(zip(tokens, answer.texts, strict=True)):
            last = index == len(tokens) - 1
            choice: dict[str, Any]
            if chat:
                choice = {"index": 0, "delta": {"content": text}, "logprobs": None,
                          "finish_reason": answer.finish if last else None}  # fmt: skip
                if last:
                    choice["stop_reason"] = None
                choice["token_ids"] = [token] if ids else None
            else:
                choice = {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": answer.finish if last else None,
                    "stop_reason": None,
                    "prompt_token_ids": prompt if ids and index == 0 else None,
                    "token_ids": [token] if ids else None,
                }
            chunk = head([choice])
            if last and not usage_wanted:
                chunk["system_fingerprint"] = self.behaviour.name
            chunks.append(chunk)
        if usage_wanted:
            tail = head([])
            tail["usage"] = _usage(len(prompt), len(tokens))
            tail["system_fingerprint"] = self.behaviour.name
            chunks.append(tail)
        return chunks

    def whole_answer(self, body: dict[str, Any], answer: FakeLMAnswer) -> dict[str, Any]:
        """The JSON vLLM would answer a non-streaming request with."""
        ids = bool(body.get("return_token_ids"))
        text = "".join(answer.texts)
        choice: dict[str, Any]
        if answer.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": answer.finish,
                "stop_reason": None,
                "token_ids": answer.tokens if ids else None,
            }
        else:
            choice = {
                "index": 0,
                "text": text,
                "logprobs": None,
                "finish_reason": answer.finish,
                "stop_reason": None,
                "token_ids": answer.tokens if ids else None,
                "prompt_token_ids": answer.prompt if ids else None,
            }
        return {
            "id": f"{'chatcmpl' if answer.chat else 'cmpl'}-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion" if answer.chat else "text_completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [choice],
            "usage": _usage(len(answer.prompt), len(answer.tokens)),
            "system_fingerprint": self.behaviour.name,
        }

    async def _complete(self, receive: Receive, send: Send, path: str) -> None:
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        stats = self.stats
        stats.requests += 1
        stats.bodies.append(body)
        stats.paths.append(path)
        answer = self.answer(path, body)
        stats.active += 1
        try:
            if body.get("stream"):
                await self._stream(body, answer, receive, send)
            else:
                behaviour = self.behaviour
                delay = behaviour.first_token_delay + behaviour.token_delay * max(
                    0, len(answer.tokens) - 1
                )
                if delay > 0:
                    await _sleep_unless_disconnected(delay, receive)
                stats.tokens_sent += len(answer.tokens)
                await _send_json(send, 200, json.dumps(self.whole_answer(body, answer)).encode())
            stats.completed += 1
        except _DisconnectedError:
            stats.disconnected += 1
        finally:
            stats.active -= 1

    async def _stream(
        self, body: dict[str, Any], answer: FakeLMAnswer, receive: Receive, send: Send
    ) -> None:
        behaviour = self.behaviour
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        tokens_seen = 0
        for chunk in self.stream_chunks(body, answer):
            carries_token = bool(chunk["choices"]) and (
                "text" in chunk["choices"][0] or "content" in chunk["choices"][0].get("delta", {})
            )
            is_token = carries_token and not (
                answer.chat and chunk["choices"][0]["delta"].get("role")
            )
            if is_token:
                delay = behaviour.first_token_delay if tokens_seen == 0 else behaviour.token_delay
                if delay > 0:
                    await _sleep_unless_disconnected(delay, receive)
                if behaviour.break_after_tokens is not None and (
                    tokens_seen >= behaviour.break_after_tokens
                ):
                    await send({"type": "http.response.body", "body": b'data: {"id": "cm',
                                "more_body": True})  # fmt: skip
                    raise RuntimeError("fake engine crashed mid-stream")
                tokens_seen += 1
                self.stats.tokens_sent += 1
            await send({"type": "http.response.body", "body": sse_event(chunk), "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})


@dataclass(frozen=True)
class FakeLMAnswer:
    chat: bool
    prompt: list[int]
    tokens: list[int]
    texts: list[str]  # per token, as the detokenizer emits it
    finish: str


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion,
            "completion_tokens": completion}  # fmt: skip


def sse_event(data: Any) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


async def _sleep_unless_disconnected(seconds: float, receive: Receive) -> None:
    """Sleep, but raise :class:`_DisconnectedError` as soon as the client goes away."""
    disconnect = asyncio.ensure_future(receive())
    sleep = asyncio.ensure_future(asyncio.sleep(seconds))
    try:
        done, _ = await asyncio.wait({disconnect, sleep}, return_when=asyncio.FIRST_COMPLETED)
        if disconnect in done and disconnect.result()["type"] == "http.disconnect":
            raise _DisconnectedError
    finally:
        disconnect.cancel()
        sleep.cancel()


async def _send_json(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _route_or_answer(scope: Scope, receive: Receive, send: Send) -> tuple[str, str] | None:
    """What every fake engine does alike: lifespan and ``GET /health``; otherwise the
    request's (method, path) for the engine to route."""
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return None
    if scope["type"] != "http":
        return None
    if scope["method"] == "GET" and scope["path"] == "/health":
        await _send_json(send, 200, b"{}")
        return None
    return scope["method"], scope["path"]


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- running servers ----------------------------------------------------------------------


def _config(app: Any, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="on", **kwargs
    )


def _bound_url(server: uvicorn.Server, host: str) -> str:
    port = server.servers[0].sockets[0].getsockname()[1]
    return f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def serve_asgi(
    app: Any, host: str = "127.0.0.1", port: int = 0, **kwargs: Any
) -> AsyncIterator[str]:
    """Run ``app`` under uvicorn in the current event loop; yields its base URL."""
    server = uvicorn.Server(_config(app, host, port, **kwargs))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("server exited during start-up")
        await asyncio.sleep(0.005)
    try:
        yield _bound_url(server, host)
    finally:
        server.should_exit = True
        await task


class ServerThread:
    """Run an ASGI app under uvicorn in a thread with its own event loop (for sync code:
    schemathesis, the sync openai client, benchmarks). ``app_factory`` runs in that thread,
    so loop-bound objects (a FakeClusterBackend) can be created there."""

    def __init__(
        self, app_factory: Callable[[], Any], host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self._factory = app_factory
        self._host = host
        self._port = port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.url = ""
        self.app: Any = None

    def __enter__(self) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="asgi-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("server did not start within 30 s")
        if self._error is not None:
            raise RuntimeError("server failed to start") from self._error
        return self

    def _run(self) -> None:
        async def main() -> None:
            try:
                self.app = self._factory()
                self._server = uvicorn.Server(_config(self.app, self._host, self._port))
                serving = asyncio.create_task(self._server.serve())
                while not self._server.started and not serving.done():
                    await asyncio.sleep(0.005)
                if serving.done():
                    serving.result()
                self.url = _bound_url(self._server, self._host)
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            await serving

        asyncio.run(main())

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
