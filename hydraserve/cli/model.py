"""``hydraserve model``: build demo checkpoints, push checkpoints to a store, list a store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from hydraserve.cli.common import byte_progress, console, setup_logging

app = typer.Typer(help="Build, push and list models in a model store.", no_args_is_help=True)


@app.command("make-demo")
def make_demo(
    dest: Path = typer.Argument(..., help="Directory to write the checkpoint into."),
    size: str = typer.Option(
        "tiny", help="tiny (~1 MB, tests), small, 100m, 1g, 2g or 4g (benchmarks)."
    ),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same weights."),
) -> None:
    """Build a random-weight Llama checkpoint and a byte-level BPE tokenizer, offline."""
    from hydraserve.store.demo import DEMO_SIZES, make_demo_model

    setup_logging()
    if size not in DEMO_SIZES:
        raise typer.BadParameter(f"choose one of {', '.join(DEMO_SIZES)}", param_hint="--size")
    with byte_progress() as update:
        make_demo_model(dest, size, seed, progress=lambda d, t: update("weights", d, t))
    console.print(f"demo model [bold]{size}[/] written to {dest}")


@app.command("push")
def push(
    src: Path = typer.Argument(..., help="A Hugging Face checkpoint directory (safetensors)."),
    uri: str = typer.Argument(..., help="Model location: s3://bucket/prefix or a local path."),
    revision: str = typer.Option("main", help="Revision to write under the location."),
    name: str | None = typer.Option(None, help="Model name (default: last path component)."),
    part_mb: int = typer.Option(64, help="Store the weights as parts of this many MB (0: one)."),
) -> None:
    """Convert a checkpoint to the store layout and upload it (with checksums and partitions).

    Refuses what cannot be served (quantized, pickled .bin weights, an architecture the
    engine does not know) before uploading; streams part by part with parallel uploads, and
    run again after an interruption it skips the parts already in the store."""
    from hydraserve.store import ModelRef, ModelStore

    settings = setup_logging()
    store = ModelStore(ModelRef(uri, revision), settings.s3)
    with byte_progress() as update:
        manifest = store.push(src, name=name, progress=update, part_bytes=part_mb << 20)
    report = store.last_push
    resumed = (
        f"; {report.skipped_bytes / 1e6:.1f} MB were already there"
        if report is not None and report.skipped_bytes
        else ""
    )
    console.print(
        f"pushed [bold]{manifest.name}[/] ({manifest.total_bytes / 1e6:.1f} MB, "
        f"{len(manifest.tensors)} tensors, {manifest.dtype}, layout {manifest.layout}) to "
        f"{uri}@{revision}{resumed}"
    )


@app.command("ls")
def ls(root: str = typer.Argument(..., help="Store root: s3://bucket[/prefix] or a path.")) -> None:
    """List the models (with a complete manifest) under a store root."""
    from hydraserve.store import list_models

    settings = setup_logging()
    table = Table("uri", "revision", "architecture", "layers", "size (MB)", "layout")
    for item in list_models(root, settings.s3):
        m = item.manifest
        table.add_row(
            item.uri,
            item.revision,
            m.architecture,
            str(m.num_layers),
            f"{m.total_bytes / 1e6:.1f}",
            m.layout,
        )
    console.print(table)
