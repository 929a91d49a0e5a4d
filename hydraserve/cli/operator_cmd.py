"""``hydraserve operator``: the Kubernetes operator (kopf)."""

from __future__ import annotations

import typer


def operator() -> None:
    """Run the operator that reconciles ServerlessModel resources."""
    typer.echo("`hydraserve operator` is not available in this build yet", err=True)
    raise typer.Exit(2)
