"""``hydraserve model push / ls / show`` say how much of a model is zero copy and what each
pipeline rank fetches."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from hydraserve.cli import model as model_cli
from hydraserve.cli.main import app
from hydraserve.settings import CommonSettings

runner = CliRunner()


@pytest.fixture(autouse=True)
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    # Process-wide logging onto the runner's captured stream would outlive the test.
    monkeypatch.setattr(model_cli, "setup_logging", CommonSettings)


def test_push_ls_and_show_report_the_zero_copy_share_and_the_stages(
    demo_checkpoint: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    pushed = runner.invoke(app, ["model", "push", str(demo_checkpoint), str(store / "tiny")])
    assert pushed.exit_code == 0, pushed.output
    assert "zero copy: 100% of the bytes" in pushed.output
    listed = runner.invoke(app, ["model", "ls", str(store)])
    assert listed.exit_code == 0 and "100%" in listed.output
    shown = runner.invoke(app, ["model", "show", str(store / "tiny")], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    rows = [line for line in shown.output.splitlines() if line.startswith("│ 2 ")]
    assert len(rows) == 2 and all("100%" in row for row in rows), shown.output
