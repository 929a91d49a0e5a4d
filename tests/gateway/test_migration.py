"""Moving a request between instances, pure: which can move, the cost model, and stream
stitching (no duplicated or missing token, whatever the cut; chat re-wrapped; usage)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from hydraserve.gateway.migration import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    LOAD_KEY,
    SAVE_KEY,
    UNBOUNDED_MAX_TOKENS,
    MigrationCosts,
    MigrationMethod,
    PrefillEstimator,
    StreamStitcher,
    choose_method,
    pinned_reason,
)
from hydraserve.gateway.sse import data_payloads
from tests.support.fakes import FakeLMBehaviour, FakeLMEngine

# --- which requests can move -------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"prompt": "x", "n": 2}, "n"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "echo": True}, "echo"),
        ({"prompt": "x", "logprobs": 1}, "logprobs"),
        ({"messages": [], "logprobs": True}, "logprobs"),
        ({"prompt": "x", "stop": ["\n"]}, "stop"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": "x", "repetition_penalty": 1.2}, "repetition_penalty"),
        ({"messages": [], "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [], "tools": [{"type": "function"}]}, "tools"),
        ({"prompt": "x", "guided_choice": ["a", "b"]}, "guided_choice"),
        ({"prompt": ["a", "b"]}, "several_prompts"),
    ],
)
def test_requests_that_cannot_continue_exactly_are_pinned(
    body: dict[str, Any], reason: str
) -> None:
    endpoint = CHAT_COMPLETIONS if "messages" in body else COMPLETIONS
    assert pinned_reason(endpoint, {"model": "m", **body}) == reason


def test_multimodal_chat_is_pinned_and_plain_requests_are_not() -> None:
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
    assert pinned_reason(CHAT_COMPLETIONS, {"messages": [image]}) == "non_text_content"
    text = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    plain = {"messages": [text], "temperature": 0, "response_format": {"type": "text"},
             "presence_penalty": 0, "repetition_penalty": 1, "n": 1, "stop": []}  # fmt: skip
    assert pinned_reason(CHAT_COMPLETIONS, plain) is None
    assert pinned_reason(COMPLETIONS, {"prompt": [1, 2, 3], "seed": 4}) is None
    assert pinned_reason("/v1/embeddings", {}) == "endpoint"


# --- the cost model ----------------------------------------------------------------------

COSTS = MigrationCosts(
    kv_bytes_per_token=256 << 10, kv_bytes_per_s=1e9, kv_fixed_seconds=0.05,
    prefill_tokens_per_s=1000.0,
)  # fmt: skip


def test_short_contexts_recompute_and_long_ones_move_their_kv() -> None:
    # recompute: 1 ms per token; kv: 0.05 s + 256 KiB per token at 1 GB/s (0.26 ms each).
    short = choose_method(20, COSTS, kv_possible=True)
    assert short.method == MigrationMethod.RECOMPUTE
    assert short.recompute_seconds == pytest.approx(0.02)
    assert short.kv_seconds == pytest.approx(0.05 + 20 * 2**18 / 1e9)
    long = choose_method(5000, COSTS, kv_possible=True)
    assert long.method == MigrationMethod.KV
    assert long.kv_seconds is not None and long.kv_seconds < long.recompute_seconds


def test_kv_is_chosen_only_where_possible_and_preferences_force_a_method() -> None:
    assert choose_method(5000, COSTS, kv_possible=False).method == MigrationMethod.RECOMPUTE
    unknown = MigrationCosts(None, 1e9, 0.0, 1000.0)
    assert choose_method(5000, unknown, kv_possible=True).method == MigrationMethod.RECOMPUTE
    assert choose_method(20, COSTS, kv_possible=True, prefer="kv").method == MigrationMethod.KV
    forced = choose_method(5000, COSTS, kv_possible=True, prefer="recompute")
    assert forced.method == MigrationMethod.RECOMPUTE
    # Forcing KV where it is impossible still moves the request (by recompute).
    assert choose_method(20, COSTS, kv_possible=False, prefer="kv").method == "recompute"


def test_prefill_throughput_is_learnt_from_long_prompts_only() -> None:
    estimator = PrefillEstimator(default=1000.0, weight=0.5, min_tokens=32)
    assert estimator.tokens_per_s == 1000.0
    estimator.observe(8, 0.001)  # too short to say anything about prefill
    assert estimator.tokens_per_s == 1000.0
    estimator.observe(400, 0.1)
    assert estimator.tokens_per_s == pytest.approx(4000.0)
    estimator.observe(400, 0.2)
    assert estimator.tokens_per_s == pytest.approx(3000.0)


# --- stitching ---------------------------------------------------------------------------


def payload(chunk: Any) -> bytes:
    return b"[DONE]" if chunk == "[DONE]" else json.dumps(chunk).encode()


def client_view(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(p) for p in data_payloads(raw) if p != b"[DONE]"]


def run_moved(
    endpoint: str,
    body: dict[str, Any],
    cut: int | None,
    *,
    method: MigrationMethod = MigrationMethod.RECOMPUTE,
    behaviour: FakeLMBehaviour | None = None,
) -> tuple[StreamStitcher, bytes, list[dict[str, Any]]]:
    """Relay ``body`` through a stitcher from engine A, move it to engine B after ``cut``
    upstream chunks (None: never), and return what the client got plus B's requests."""
    old, new = FakeLMEngine(behaviour), FakeLMEngine(behaviour)
    stitcher = StreamStitcher(endpoint, body, bool(body.get("stream")))
    upstream = json.loads(stitcher.upstream_body())
    chunks: list[Any] = old.stream_chunks(upstream, old.answer(endpoint, upstream))
    chunks.append("[DONE]")
    out = b""
    moved_bodies = []
    if cut is None or cut >= len(chunks):
        cut = len(chunks)
    for chunk in chunks[:cut]:
        out += stitcher.feed(payload(chunk)).data
    if not stitcher.done:
        if stitcher.finished:
            out += stitcher.finish_early().data
        else:
            path, raw = stitcher.continuation(method)
            cont = json.loads(raw)
            moved_bodies.append({"path": path, **cont})
            more: list[Any] = [*new.stream_chunks(cont, new.answer(path, cont)), "[DONE]"]
            for chunk in more:
                out += stitcher.feed(payload(chunk)).data
    assert stitcher.done
    return stitcher, out, moved_bodies


def reference(endpoint: str, body: dict[str, Any], behaviour: FakeLMBehaviour | None = None):  # type: ignore[no-untyped-def]
    engine = FakeLMEngine(behaviour)
    return engine, engine.answer(endpoint, body)


def texts(events: list[dict[str, Any]], chat: bool) -> str:
    out = []
    for event in events:
        for choice in event.get("choices") or []:
            out.append(choice["delta"].get("content") or "" if chat else choice["text"])
    return "".join(out)


def token_ids(events: list[dict[str, Any]]) -> list[int]:
    return [t for e in events for c in e.get("choices") or [] for t in c.get("token_ids") or []]


CASES = [
    (COMPLETIONS, {"model": "m", "prompt": "Once upon a time", "max_tokens": 24}),
    (COMPLETIONS, {"model": "m", "prompt": "hello", "max_tokens": 40, "return_token_ids": True,
                   "stream_options": {"include_usage": True}}),
    (COMPLETIONS, {"model": "m", "prompt": "no limit given"}),  # vLLM's default of 16
    (CHAT_COMPLETIONS, {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "max_tokens": 30, "stream_options": {"include_usage": True}}),
    (CHAT_COMPLETIONS, {"model": "m", "messages": [{"role": "user", "content": "hey"}],
                        "max_completion_tokens": 20, "return_token_ids": True}),
]  # fmt: skip


@pytest.mark.parametrize(("endpoint", "body"), CASES)
def test_a_stream_moved_after_any_chunk_equals_the_unmoved_stream(
    endpoint: str, body: dict[str, Any]
) -> None:
    chat = endpoint == CHAT_COMPLETIONS
    body = {**body, "stream": True}
    engine, ref = reference(endpoint, body)
    expected_events = engine.stream_chunks(body, ref)
    expected_text = texts(expected_events, chat)
    assert any(t == "" for t in ref.texts), "the case must hold back some tokens"
    upstream_chunks = len(expected_events) + 1
    for cut in range(upstream_chunks + 1):
        stitcher, raw, moved = run_moved(endpoint, body, cut)
        events = client_view(raw)
        assert raw.endswith(b"data: [DONE]\n\n"), cut
        assert texts(events, chat) == expected_text, cut
        assert stitcher.generated == ref.tokens, cut
        ids = {e["id"] for e in events}
        assert len(ids) == 1, (cut, ids)  # one response id, whichever engine answered
        kind = "chat.completion.chunk" if chat else "text_completion"
        assert {e["object"] for e in events} == {kind}, cut
        finishes = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert finishes == [ref.finish], cut
        if body.get("return_token_ids"):
            assert token_ids(events) == ref.tokens, cut
        else:
            assert token_ids(events) == [], cut
            assert all(e.get("prompt_token_ids") is None for e in events), cut
            assert all(c.get("prompt_token_ids") is None for e in events for c in e["choices"]), cut
        usage = [e["usage"] for e in events if e.get("usage")]
        if (body.get("stream_options") or {}).get("include_usage"):
            assert usage == [{"prompt_tokens": len(ref.prompt), "completion_tokens":
                              len(ref.tokens), "total_tokens": len(ref.prompt) +
                              len(ref.tokens)}], cut  # fmt: skip
        else:
            assert usage == [], cut
        if moved:
            # The continuation: a token-id completion of exactly what is left.
            (cont,) = moved
            if cont["path"] == endpoint and cont.get("prompt") == body.get("prompt"):
                assert cut <= 1  # nothing had arrived: the request starts over
                continue
            assert cont["path"] == COMPLETIONS
            assert cont["prompt"][: len(ref.prompt)] == ref.prompt
            generated_before = len(cont["prompt"]) - len(ref.prompt)
            assert cont["prompt"][len(ref.prompt) :] == ref.tokens[:generated_before]
            if body.get("max_tokens") or body.get("max_completion_tokens"):
                limit = body.get("max_tokens") or body["max_completion_tokens"]
                assert cont["max_tokens"] == limit - generated_before
            elif chat:
                assert cont["max_tokens"] == UNBOUNDED_MAX_TOKENS
            else:
                assert cont["max_tokens"] == 16 - generated_before
            assert "messages" not in cont and "max_completion_tokens" not in cont


def test_held_back_tokens_are_never_relayed_before_their_text() -> None:
    # Held tokens go out only together with the text that completes them, so what the
    # client has is always a clean cut: the text of exactly the tokens relayed.
    body = {"model": "m", "prompt": "abc", "max_tokens": 30, "stream": True,
            "return_token_ids": True}  # fmt: skip
    engine, ref = reference(COMPLETIONS, body)
    stitcher = StreamStitcher(COMPLETIONS, body, True)
    upstream = json.loads(stitcher.upstream_body())
    client_text = ""
    holds = 0
    for chunk in engine.stream_chunks(upstream, engine.answer(COMPLETIONS, upstream)):
        before = len(stitcher.generated)
        relayed = stitcher.feed(payload(chunk))
        events = client_view(relayed.data)
        if not events and chunk["choices"]:
            holds += 1
            assert len(stitcher.generated) == before  # a held token is not counted yet
        if events:
            last = events[-1]["choices"][0]
            assert last["text"] or last["finish_reason"]
        client_text += texts(events, chat=False)
        assert client_text == "".join(ref.texts[: len(stitcher.generated)])
        if stitcher.generated and not stitcher.finished:
            assert not engine.incomplete(stitcher.generated[-1])
    assert holds > 0


def test_a_cut_inside_a_character_would_garble_the_text_without_holding_back() -> None:
    # The fake detokenizer re-emits the prompt when a prompt ends mid-character (as
    # tokenizers' DecodeStream does): continuing from a held token would show that.
    engine = FakeLMEngine()
    _, ref = reference(COMPLETIONS, {"prompt": "abc", "max_tokens": 30})
    held = next(i for i, text in enumerate(ref.texts) if text == "")
    naive = engine.detokenize_stream(ref.prompt + ref.tokens[: held + 1], ref.tokens[held + 1 :])
    assert "".join(ref.texts[: held + 1]) + "".join(naive) != "".join(ref.texts)


@pytest.mark.parametrize(("endpoint", "body"), CASES)
def test_a_non_streaming_request_moved_mid_way_gets_the_unmoved_answer(
    endpoint: str, body: dict[str, Any]
) -> None:
    engine, ref = reference(endpoint, body)
    expected = engine.whole_answer(body, ref)
    for cut in range(0, len(ref.tokens) + 3, 3):
        stitcher, raw, _ = run_moved(endpoint, body, cut)
        assert raw == b""  # nothing is sent before the whole answer
        answer = json.loads(stitcher.final_body())
        assert answer["object"] == expected["object"]
        choice, want = answer["choices"][0], expected["choices"][0]
        if endpoint == CHAT_COMPLETIONS:
            assert choice["message"]["content"] == want["message"]["content"], cut
            assert choice["message"]["role"] == "assistant"
        else:
            assert choice["text"] == want["text"], cut
        assert choice["finish_reason"] == want["finish_reason"]
        assert answer["usage"] == expected["usage"], cut
        assert choice["token_ids"] == want["token_ids"]
        assert answer["id"].startswith("chatcmpl-" if endpoint == CHAT_COMPLETIONS else "cmpl-")


def test_continuation_carries_sampling_parameters_and_kv_keys() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
            "temperature": 0.7, "top_p": 0.9, "top_k": 5, "seed": 3, "min_tokens": 10,
            "max_tokens": 20, "ignore_eos": True, "skip_special_tokens": False,
            "chat_template_kwargs": {"x": 1}, "user": "u"}  # fmt: skip
    stitcher = StreamStitcher(CHAT_COMPLETIONS, body, True)
    assert json.loads(stitcher.upstream_body("req-1"))["kv_transfer_params"] == {SAVE_KEY: "req-1"}
    engine = FakeLMEngine()
    upstream = json.loads(stitcher.upstream_body())
    for chunk in engine.stream_chunks(upstream, engine.answer(CHAT_COMPLETIONS, upstream))[:4]:
        stitcher.feed(payload(chunk))
    generated = len(stitcher.generated)
    assert generated >= 1
    path, raw = stitcher.continuation(MigrationMethod.KV, load_key="req-1", save_key="req-2")
    cont = json.loads(raw)
    assert path == COMPLETIONS
    for key in ("temperature", "top_p", "top_k", "seed", "ignore_eos", "skip_special_tokens",
                "user"):  # fmt: skip
        assert cont[key] == body[key], key
    assert cont["min_tokens"] == 10 - generated
    assert cont["max_tokens"] == 20 - generated
    assert cont["kv_transfer_params"] == {LOAD_KEY: "req-1", SAVE_KEY: "req-2"}
    assert cont["return_token_ids"] is True and cont["stream"] is True
    assert "chat_template_kwargs" not in cont and "stream_options" not in cont


def test_a_request_moved_before_anything_arrived_starts_over() -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 5, "stream": True}
    stitcher = StreamStitcher(COMPLETIONS, body, True)
    path, raw = stitcher.continuation(MigrationMethod.RECOMPUTE)
    assert path == COMPLETIONS
    assert json.loads(raw) == {**body, "return_token_ids": True}


def test_a_move_after_the_last_token_only_ends_the_stream() -> None:
    body = {"model": "m", "prompt": "hi", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    engine, ref = reference(COMPLETIONS, body)
    chunks = engine.stream_chunks(body, ref)
    last_token = len(chunks) - 1  # the usage chunk comes after it
    _, raw, moved = run_moved(COMPLETIONS, body, last_token)
    assert moved == []
    events = client_view(raw)
    assert events[-1]["usage"]["completion_tokens"] == 5
    assert raw.endswith(b"data: [DONE]\n\n")


def test_engine_errors_are_relayed_and_remembered() -> None:
    stitcher = StreamStitcher(COMPLETIONS, {"model": "m", "prompt": "x", "stream": True}, True)
    error = {"error": {"message": "boom", "type": "InternalServerError", "code": 500}}
    relayed = stitcher.feed(json.dumps(error).encode())
    assert client_view(relayed.data) == [error]
    assert stitcher.error == error
