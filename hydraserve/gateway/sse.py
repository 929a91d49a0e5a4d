"""Server-sent events: framing, keep-alives and the error event (pure).

The gateway relays an engine's event stream, but only ever in whole events: if the engine
dies mid-event, the client must not receive half a JSON document. :class:`EventFramer`
holds back an incomplete tail until its terminating blank line arrives.
"""

from __future__ import annotations

import json

from hydraserve.gateway.errors import GatewayError

KEEPALIVE = b": keep-alive\n\n"
DONE = b"data: [DONE]\n\n"
DONE_MARK = b"data: [DONE]"
DATA_MARK = b"data:"


class EventFramer:
    """Splits a byte stream into whole SSE events (terminated by a blank line)."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        """The complete events now available (possibly ``b""``), in order."""
        data = self._pending + chunk if self._pending else chunk
        end = _last_event_end(data)
        if end == 0:
            self._pending = data
            return b""
        self._pending = data[end:]
        return data[:end]

    @property
    def pending(self) -> bytes:
        """An incomplete event the stream ended in the middle of."""
        return self._pending


def _last_event_end(data: bytes) -> int:
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def data_payloads(events: bytes) -> list[bytes]:
    """The ``data`` of each event in whole events (comments such as keep-alives skipped)."""
    out = []
    for event in events.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:] for line in event.split(b"\n") if line.startswith(DATA_MARK)]
        if lines:
            out.append(b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines))
    return out


def count_token_events(events: bytes) -> int:
    """Data events carrying output (every ``data:`` line but ``[DONE]``)."""
    count = events.count(DATA_MARK)
    if DONE_MARK in events:
        count -= 1
    return count


def error_event(error: GatewayError) -> bytes:
    """A data event the OpenAI SDKs raise as an ``APIError``, followed by ``[DONE]``."""
    return b"data: " + json.dumps(error.body()).encode() + b"\n\n" + DONE
