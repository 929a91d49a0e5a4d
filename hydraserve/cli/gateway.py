"""``hydraserve gateway``: the OpenAI-compatible front door."""

from __future__ import annotations

import typer


def gateway(
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(8000),
) -> None:
    """Run the gateway against a Kubernetes cluster (ServerlessModel resources)."""
    typer.echo("`hydraserve gateway` is not available in this build yet", err=True)
    raise typer.Exit(2)
