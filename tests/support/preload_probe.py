"""A warm runtime preload target for tests: records which process ran it."""

from __future__ import annotations

import os

LOADED_IN: int | None = None


def mark() -> None:
    global LOADED_IN
    LOADED_IN = os.getpid()
