"""``hydraserve up``: the whole platform on this machine."""

from __future__ import annotations

from pathlib import Path

import typer

from hydraserve.cli.common import setup_logging


def up(
    host: str = typer.Option("127.0.0.1", help="Address of the OpenAI-compatible API."),
    port: int = typer.Option(8000, help="Port of the OpenAI-compatible API."),
    state_dir: Path | None = typer.Option(None, help="Where models, logs and caches live."),
    models_file: Path | None = typer.Option(
        None, help="YAML of more ServerlessModel documents to register."
    ),
    demo_size: str = typer.Option("tiny", help="Size of the demo model built on first run."),
    keep_alive: float = typer.Option(60.0, help="Seconds without requests before scale to 0."),
    emulated_nodes: int = typer.Option(
        0,
        min=0,
        max=8,
        help="Emulate a cluster of this many nodes (network namespaces; needs root): the "
        "planner places instances and pipelines over them.",
    ),
    link_mbit: float = typer.Option(100.0, help="Each emulated node's link rate, Mbit/s."),
    demo_ttft_slo: float | None = typer.Option(
        None, help="The demo model's TTFT SLO in seconds (the planner sizes pp for it)."
    ),
) -> None:
    """Run gateway and local worker backend on this machine, with the demo model registered
    at zero replicas (the first request starts it)."""
    from hydraserve.platform import PlatformSettings, run_platform

    settings = PlatformSettings()
    setup_logging()
    settings.host, settings.port = host, port
    settings.demo_size, settings.keep_alive_seconds = demo_size, keep_alive
    if state_dir is not None:
        settings.common.state_dir = state_dir
    if models_file is not None:
        settings.models_file = models_file
    if emulated_nodes:
        settings.emulated_nodes, settings.link_mbit = emulated_nodes, link_mbit
    if demo_ttft_slo is not None:
        settings.demo_ttft_slo_seconds = demo_ttft_slo
    run_platform(settings)
