"""``hydraserve gateway``: the OpenAI-compatible front door."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from hydraserve.backends.base import ClusterBackend
from hydraserve.cli.common import setup_logging
from hydraserve.gateway.server import gateway_server
from hydraserve.gateway.settings import GatewaySettings


class BackendUnavailableError(RuntimeError):
    """No cluster backend can be built in this process (the message says why)."""


def build_backend(settings: GatewaySettings) -> ClusterBackend:
    """The Kubernetes backend: ServerlessModel objects (list/watch) for the views, their
    scale subresource for ``scale``; in-cluster credentials, or a kubeconfig."""
    from hydraserve.backends.kubernetes import KubernetesBackend
    from hydraserve.kube.client import KubeClient, KubeConfigError, load_config

    try:
        config = load_config(settings.kubeconfig)
    except KubeConfigError as exc:
        raise BackendUnavailableError(
            f"{exc}; run inside a cluster, set KUBECONFIG, or use `hydraserve up` for the "
            "embedded platform on this machine"
        ) from exc
    client = KubeClient(config)
    if len(settings.namespaces) == 1:
        return KubernetesBackend(client, settings.namespaces[0])
    return KubernetesBackend(client, None, frozenset(settings.namespaces))


def run_gateway(backend: ClusterBackend, settings: GatewaySettings) -> None:
    """Serve until interrupted (the standalone gateway owns its backend)."""
    gateway_server(backend, settings).run()


def gateway(
    host: str | None = typer.Option(None, help="Address to listen on (default 0.0.0.0)."),
    port: int | None = typer.Option(None, help="Port to listen on (default 8000)."),
    api_keys_file: Path | None = typer.Option(
        None, help="YAML file of hashed API keys (e.g. a mounted Kubernetes Secret)."
    ),
    no_auth: bool = typer.Option(
        False, "--no-auth", help="Serve without API keys (private, single-user setups only)."
    ),
) -> None:
    """Run the gateway against a Kubernetes cluster (ServerlessModel resources).

    All settings also come from HYDRASERVE_GATEWAY_* environment variables; flags win.

    API keys are required unless --no-auth is given. Make one with:
    python -m hydraserve.gateway.auth --name NAME --models PATTERN
    """
    setup_logging()
    overrides: dict[str, Any] = {}
    if host is not None:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    if api_keys_file is not None:
        overrides["api_keys_file"] = api_keys_file
    if no_auth:
        overrides["auth_enabled"] = False
    settings = GatewaySettings(**overrides)
    try:
        backend = build_backend(settings)
    except BackendUnavailableError as exc:
        typer.echo(f"hydraserve gateway: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        run_gateway(backend, settings)
    except ValueError as exc:  # configuration problems found while building the app
        typer.echo(f"hydraserve gateway: {exc}", err=True)
        raise typer.Exit(2) from None
