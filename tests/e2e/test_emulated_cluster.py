"""`hydraserve up` on an emulated cluster: the planner, not an override, makes a pipeline.

Two network-namespace nodes with 10 Mbit/s links to the store. The demo model (`small`,
~13 MB) over one link takes ~11 s; the planner predicts a pp = 1 cold start misses an 11 s
TTFT SLO while pp = 2 (each node fetches half) meets it, so it must choose pp = 2 by
itself. The request is then served through the gateway by stages in both namespaces.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from openai import OpenAI

from tests.e2e.conftest import start_platform, stop_platform

pytestmark = [pytest.mark.slow, pytest.mark.netns]


def placements(state_dir: Path) -> list[dict[str, object]]:
    events = []
    for timeline in sorted((state_dir / "instances").glob("*/timeline.jsonl")):
        for line in timeline.read_text().splitlines():
            event = json.loads(line)
            if event["stage"] == "placement":
                events.append(event)
    return events


def emulated_namespaces() -> set[str]:
    run_dir = Path("/var/run/netns")
    return {p.name for p in run_dir.glob("hs*")} if run_dir.exists() else set()


def test_planner_chooses_a_pipeline_over_emulated_nodes(tmp_path: Path) -> None:
    before = emulated_namespaces()
    platform = start_platform(
        tmp_path / "platform",
        # One engine per node is enough here: no consolidation (it would start a third).
        env={"HYDRASERVE_LOCAL_CONSOLIDATION": "false"},
        args=[
            "--emulated-nodes", "2", "--link-mbit", "10",
            "--demo-size", "small", "--demo-ttft-slo", "11",
        ],
        bad_models=False,
        timeout=300,
    )  # fmt: skip
    try:
        openai = OpenAI(base_url=platform.url, api_key="unused", max_retries=0, timeout=600)
        out = openai.completions.create(model="demo", prompt="Hello", max_tokens=8)
        assert out.usage is not None and out.usage.completion_tokens == 8
        (placement,) = placements(platform.state_dir)
        assert placement["pp"] == 2, placement
        # Each stage ran inside its own emulated node (its own address), behind its link.
        (instance,) = (platform.state_dir / "instances").iterdir()
        hosts = [
            json.loads((instance / f"stage{rank}.json").read_text())["host"] for rank in (0, 1)
        ]
        assert len(set(hosts)) == 2 and all(h.startswith("10.") for h in hosts), hosts
    finally:
        stop_platform(platform)
    # Every namespace is gone with the platform.
    assert emulated_namespaces() <= before
