"""The Grafana dashboard only queries metrics the gateway exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hydraserve.gateway.metrics import GatewayMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "hydraserve-dashboard.json"


def exported_series() -> set[str]:
    names = set()
    for family in GatewayMetrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
        if family.type == "histogram":
            names.update(f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return names


def test_every_queried_metric_exists_and_labels_are_real() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series()
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(targets) >= 15
    for target in targets:
        queried = set(re.findall(r"\b(hydraserve_[a-z_]+)\b", target["expr"]))
        assert queried, target["expr"]
        assert queried <= exported, queried - exported
        labels = set(re.findall(r"\{\{(\w+)\}\}", target.get("legendFormat", "")))
        assert labels <= {
            "model",
            "status",
            "endpoint",
            "reason",
            "phase",
            "stage",
            "method",
            "start",
        }


def test_panels_do_not_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}  # fmt: skip
        assert not mine & cells, panel["title"]
        cells |= mine
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
