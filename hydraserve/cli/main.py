"""Entry point of the ``hydraserve`` command."""

from __future__ import annotations

import typer

from hydraserve import __version__
from hydraserve.cli import bench, gateway, model, operator_cmd, platform, prefetcher, worker

app = typer.Typer(
    name="hydraserve",
    help="Serverless LLM serving with fast cold starts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(model.app, name="model")
app.add_typer(bench.app, name="bench")
app.command("up")(platform.up)
app.command("gateway")(gateway.gateway)
app.command("worker")(worker.worker)
app.command("prefetcher")(prefetcher.prefetcher)
app.command("operator")(operator_cmd.operator)


@app.command("version")
def version() -> None:
    """Print the HydraServe version."""
    typer.echo(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
