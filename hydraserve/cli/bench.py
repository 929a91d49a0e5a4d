"""``hydraserve bench``: benchmarks and the cluster simulator."""

from __future__ import annotations

import typer

app = typer.Typer(help="Benchmarks and the cluster simulator.", no_args_is_help=True)
