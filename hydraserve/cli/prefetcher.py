"""``hydraserve prefetcher``: the node prefetcher service."""

from __future__ import annotations

import typer


def prefetcher(
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(8300),
) -> None:
    """Run the node prefetcher: pre-load model stages into shared memory over HTTP."""
    raise typer.Exit(_not_yet("prefetcher"))


def _not_yet(what: str) -> int:
    typer.echo(f"`hydraserve {what}` is not available in this build yet", err=True)
    return 2
