"""``hydraserve operator``: the Kubernetes operator (kopf) for ServerlessModel resources."""

from __future__ import annotations

import asyncio
from pathlib import Path

import typer

from hydraserve.cli.common import setup_logging


def operator(
    kubeconfig: Path | None = typer.Option(
        None, help="kubeconfig to use; default: in-cluster credentials, else $KUBECONFIG."
    ),
    namespace: list[str] = typer.Option(
        [], help="Namespace to watch (repeatable); default: HYDRASERVE_OPERATOR_NAMESPACES or all."
    ),
    standalone: bool | None = typer.Option(
        None, "--standalone/--peering", help="Run without leader election (one replica only)."
    ),
    print_crd: bool = typer.Option(False, help="Print the ServerlessModel CRD and exit."),
) -> None:
    """Run the operator that reconciles ServerlessModel resources into worker pods."""
    if print_crd:
        from hydraserve.api.crd import render_crd

        typer.echo(render_crd(), nl=False)
        return
    setup_logging()
    from hydraserve.kube.client import KubeConfigError, load_config
    from hydraserve.operator.handlers import OperatorApp
    from hydraserve.operator.settings import OperatorSettings

    settings = OperatorSettings()
    updates: dict[str, object] = {}
    if namespace:
        updates["namespaces"] = list(namespace)
    if standalone is not None:
        updates["standalone"] = standalone
    settings = settings.model_copy(update=updates)
    try:
        kube_config = load_config(kubeconfig)
    except KubeConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--kubeconfig") from exc
    asyncio.run(OperatorApp(settings, kube_config).run())
