from __future__ import annotations

import json

from hydraserve.gateway.errors import GatewayError
from hydraserve.gateway.sse import DONE, EventFramer, count_token_events, error_event


def test_framer_passes_whole_events_and_holds_back_a_partial_one() -> None:
    framer = EventFramer()
    assert framer.feed(b'data: {"a": 1}\n\ndata: {"b"') == b'data: {"a": 1}\n\n'
    assert framer.pending == b'data: {"b"'
    assert framer.feed(b": 2}") == b""
    assert framer.feed(b"\n\ndata: [DONE]\n\n") == b'data: {"b": 2}\n\ndata: [DONE]\n\n'
    assert framer.pending == b""


def test_framer_understands_crlf_event_ends() -> None:
    framer = EventFramer()
    assert framer.feed(b"data: x\r\n\r\ndata: y") == b"data: x\r\n\r\n"
    assert framer.pending == b"data: y"


def test_token_events_do_not_count_done_or_comments() -> None:
    assert count_token_events(b"data: {}\n\ndata: {}\n\ndata: [DONE]\n\n") == 2
    assert count_token_events(b": keep-alive\n\n") == 0


def test_error_event_is_json_in_the_openai_shape_then_done() -> None:
    event = error_event(GatewayError(502, "engine died", type="upstream_error", code="x"))
    first, rest = event.split(b"\n\n", 1)
    assert first.startswith(b"data: ")
    body = json.loads(first[len(b"data: ") :])
    assert body == {
        "error": {"message": "engine died", "type": "upstream_error", "param": None, "code": "x"}
    }
    assert rest == DONE
