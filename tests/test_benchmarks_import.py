"""Every benchmark script still imports after the code it measures moves.

The benchmarks run rarely (minutes to half an hour each, some as root), so a moved module
would otherwise surface only when someone next measures. Importing runs no benchmark: each
script acts only under ``if __name__ == "__main__"``. The scripts with an argument parser
also parse ``--help``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def benchmark_modules() -> list[str]:
    modules = []
    for path in sorted((REPO / "benchmarks").rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue  # runs on import; the --help test below covers it
        if parts[-1] == "__init__":
            parts.pop()
        modules.append(".".join(parts))
    return modules


def test_every_benchmark_module_imports() -> None:
    modules = benchmark_modules()
    assert "benchmarks.cold_start.run" in modules
    # One fresh interpreter for all of them: imports must not leak into this process.
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    done = subprocess.run(
        [sys.executable, "-c", code, *modules],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize(
    "module",
    [
        "benchmarks.cold_start.run",
        "benchmarks.consolidation.run",
        "benchmarks.gateway",
        "benchmarks.loader.run",
        "benchmarks.push.run",
        "benchmarks.slo_attainment",
    ],
)
def test_benchmark_parses_its_arguments(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("usage:"), done.stdout[:500]
