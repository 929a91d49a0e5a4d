"""The local backend applies the shared lifecycle policy to real worker processes: a
worker that always crashes is retried on the policy's backoff schedule, then the model is
Failed with the reason, and only a bounded number of processes was ever started.

The worker here crashes within a second or two, before it imports vLLM: the model's
``config.json`` in the store fails its checksum, which the worker checks while it prepares
its model directory. (The same schedule on Kubernetes: tests/operator/.)
"""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path

from hydraserve.api.models import ModelPhase, ServerlessModel
from hydraserve.backends.base import ModelView
from hydraserve.backends.local import LocalBackend, LocalSettings
from hydraserve.control.instances import backoff_delay
from hydraserve.settings import CommonSettings
from hydraserve.store import ModelRef, ModelStore


def crashing_model(tmp_path: Path, checkpoint: Path) -> ServerlessModel:
    location = tmp_path / "store" / "crash"
    ModelStore(ModelRef(str(location))).push(checkpoint)
    (location / "main" / "config.json").write_text("{}")  # no longer matches its sha256
    return ServerlessModel.model_validate(
        {
            "metadata": {"name": "crash"},
            "spec": {"source": {"uri": f"file://{location}"}, "resources": {"gpuMemoryGiB": 1}},
        }
    )


def placement_time(instance_dir: Path) -> float:
    for line in (instance_dir / "timeline.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("stage") == "placement":
            return float(event["start"])
    raise AssertionError(f"no placement event in {instance_dir}")


async def run(backend: LocalBackend) -> tuple[ModelView, int]:
    await backend.start()
    try:
        await backend.scale("crash", 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 120
        view = backend.get_model("crash")
        while loop.time() < deadline:
            view = backend.get_model("crash")
            assert view is not None
            if view.effective_phase == ModelPhase.FAILED:
                break
            await backend.wait_for_change("crash", 1.0)
        assert view is not None and view.effective_phase == ModelPhase.FAILED, view
        # Given up: however many passes follow, nothing more starts.
        target = backend.passes + 20
        while backend.passes < target:
            await asyncio.sleep(0.01)
        started = len(list(backend.instances_dir.iterdir()))
        return view, started
    finally:
        await backend.close()


def test_a_worker_that_always_crashes_backs_off_then_fails_with_few_processes(
    tmp_path: Path, demo_checkpoint: Path
) -> None:
    settings = LocalSettings(
        common=CommonSettings(state_dir=tmp_path / "state", shm_dir=tmp_path / "shm"),
        memory_budget_bytes=8 << 30,
        failure_backoff_seconds=0.5,
        failure_backoff_max_seconds=1.5,
        max_consecutive_failures=3,
        poll_seconds=0.05,
    )
    backend = LocalBackend([crashing_model(tmp_path, demo_checkpoint)], settings)
    view, started = asyncio.run(run(backend))

    assert started == 3  # max_consecutive_failures instances, and no more
    ready = next(c for c in view.conditions if c.type == "Ready")
    assert ready.reason == "InstancesFailing"
    assert "3 instances failed in a row" in ready.message and "sha256" in ready.message
    assert view.error == ready.message  # what the gateway answers with (503)

    # Each start waited at least the backoff after the failures before it.
    starts = sorted(placement_time(d) for d in backend.instances_dir.iterdir())
    policy = settings.lifecycle_policy()
    for k, (before, after) in enumerate(itertools.pairwise(starts), start=1):
        assert after - before >= backoff_delay(k, policy), (k, after - before)
