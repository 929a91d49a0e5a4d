"""``hydraserve prefetcher``: the node prefetcher service."""

from __future__ import annotations

import typer

from hydraserve.cli.common import setup_logging


def prefetcher(
    host: str = typer.Option("0.0.0.0", help="Address to listen on."),
    port: int = typer.Option(8300, help="Port to listen on."),
    node: str | None = typer.Option(None, help="Node name (default: hostname)."),
    capacity_gib: float | None = typer.Option(None, help="Host-memory cache capacity, GiB."),
) -> None:
    """Run the node prefetcher: pre-load model stages into shared memory over HTTP."""
    import uvicorn

    from hydraserve.prefetcher.api import PrefetcherSettings, build_prefetcher, create_app

    setup_logging()
    settings = PrefetcherSettings()
    if node:
        settings.node_name = node
    if capacity_gib is not None:
        settings.cache_capacity_bytes = int(capacity_gib * (1 << 30))
    app = create_app(build_prefetcher(settings))
    uvicorn.run(app, host=host, port=port, log_level="warning")
