"""Cold-start timeline: stage start/end events appended as JSON lines to a file.

Several processes write to the same file (the worker launcher, vLLM's engine and worker
processes); each event is one short ``O_APPEND`` write, which POSIX keeps whole. Times are
wall-clock seconds so events from different processes line up.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydraserve.api.models import StageTiming
from hydraserve.logs import get_logger

log = get_logger("worker.timeline")

# The stages of a cold start, in the order they begin.
STAGES = (
    "placement",
    "fetch",
    "process_start",
    "manifest",
    "fetch_start",
    "imports",
    "artifacts",
    "engine_init",
    "weight_load",
)


class Timeline:
    def __init__(self, path: Path | None, **fields: Any) -> None:
        self.path = path
        self.fields = fields
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, stage: str, start: float, end: float, **extra: Any) -> None:
        event = {"stage": stage, "start": start, "end": end, **self.fields, **extra}
        log.info("coldstart.stage", seconds=round(end - start, 4), **event)
        if self.path is None:
            return
        line = (json.dumps(event) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    @contextmanager
    def stage(self, stage: str, **extra: Any) -> Iterator[dict[str, Any]]:
        """Time the block; what it adds to the yielded dict is recorded with the stage."""
        start = time.time()
        details = dict(extra)
        try:
            yield details
        finally:
            self.record(stage, start, time.time(), **details)


def read_timeline(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def stage_timings(events: list[dict[str, Any]], origin: float) -> list[StageTiming]:
    """Merge events per stage (earliest start, latest end), relative to ``origin``."""
    merged: dict[str, tuple[float, float]] = {}
    for e in events:
        start, end = float(e["start"]), float(e["end"])
        if e["stage"] in merged:
            s0, e0 = merged[e["stage"]]
            merged[e["stage"]] = (min(s0, start), max(e0, end))
        else:
            merged[e["stage"]] = (start, end)
    order = {s: i for i, s in enumerate(STAGES)}
    return [
        StageTiming(stage=name, start=round(s - origin, 4), end=round(e - origin, 4))
        for name, (s, e) in sorted(merged.items(), key=lambda kv: (kv[1][0], order.get(kv[0], 99)))
    ]
