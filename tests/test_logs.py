"""Structured logs keep working when a caller swapped stderr for a while and closed it
(what a CLI test runner does): they go to whatever stderr is now."""

from __future__ import annotations

import io
import sys

import pytest

from hydraserve.logs import configure_logging, get_logger


def test_logs_follow_stderr_after_a_swapped_stream_was_closed(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    borrowed = io.StringIO()
    monkeypatch.setattr(sys, "stderr", borrowed)
    configure_logging("INFO", json_format=True)  # e.g. a CLI command run by a test runner
    get_logger("test").info("during", n=1)
    assert '"event": "during"' in borrowed.getvalue()
    monkeypatch.undo()
    borrowed.close()
    get_logger("test").info("after", n=2)  # raised "I/O operation on closed file" before
    assert '"event": "after"' in capsys.readouterr().err
