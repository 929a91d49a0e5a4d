"""``hydraserve up``: the whole platform on this machine."""

from __future__ import annotations

import typer


def up(
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
) -> None:
    """Run gateway and local worker backend on this machine, with the demo model registered."""
    typer.echo("not yet", err=True)
    raise typer.Exit(2)
