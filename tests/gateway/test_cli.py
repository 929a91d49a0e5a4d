"""``hydraserve gateway``: settings from flags and environment, the backend hook."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from hydraserve.backends.base import ClusterBackend
from hydraserve.cli import gateway as gateway_cli
from hydraserve.cli.main import app
from hydraserve.gateway.auth import hash_key
from hydraserve.gateway.settings import GatewaySettings
from tests.support.fakes import FakeClusterBackend, make_model

runner = CliRunner()


@pytest.fixture(autouse=True)
def keep_test_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # The command configures process-wide logging onto the runner's captured stderr,
    # which would outlive the test; the tests here do not look at log output.
    monkeypatch.setattr(gateway_cli, "setup_logging", lambda: None)


def test_without_a_backend_the_command_explains_and_exits_2() -> None:
    result = runner.invoke(app, ["gateway", "--no-auth"])
    assert result.exit_code == 2
    assert "hydraserve up" in result.output


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Builds the real server object but does not run it."""
    captured: list[Any] = []
    backend = FakeClusterBackend([make_model("demo")])

    def build_backend(settings: GatewaySettings) -> ClusterBackend:
        return backend

    def run_gateway(backend: ClusterBackend, settings: GatewaySettings) -> None:
        captured.append(gateway_cli.gateway_server(backend, settings))

    monkeypatch.setattr(gateway_cli, "build_backend", build_backend)
    monkeypatch.setattr(gateway_cli, "run_gateway", run_gateway)
    return captured


def test_flags_and_environment_become_settings(
    served: list[Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": "a", "sha256": hash_key("k")}]}))
    monkeypatch.setenv("HYDRASERVE_GATEWAY_QUEUE_SIZE_PER_MODEL", "7")
    result = runner.invoke(
        app, ["gateway", "--port", "9123", "--host", "127.0.0.1", "--api-keys-file", str(keys)]
    )
    assert result.exit_code == 0, result.output
    server = served[0]
    assert server.config.port == 9123 and server.config.host == "127.0.0.1"
    gateway = server.config.app.state.gateway
    assert gateway.settings.queue_size_per_model == 7
    assert gateway.authenticator is not None and gateway.authenticator.key_names == ["a"]


def test_auth_is_required_unless_turned_off(served: list[Any]) -> None:
    refused = runner.invoke(app, ["gateway"])
    assert refused.exit_code == 2
    assert "HYDRASERVE_GATEWAY_API_KEYS_FILE" in refused.output
    allowed = runner.invoke(app, ["gateway", "--no-auth"])
    assert allowed.exit_code == 0, allowed.output
    assert served[-1].config.app.state.gateway.authenticator is None


def test_help_explains_the_command() -> None:
    result = runner.invoke(app, ["gateway", "--help"])
    assert result.exit_code == 0
    assert "--api-keys-file" in result.output and "HYDRASERVE_GATEWAY_" in result.output
