"""``hydraserve model``: build demo checkpoints, push checkpoints to a store, list a store."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from hydraserve.cli.common import byte_progress, console, setup_logging
from hydraserve.store.manifest import Manifest

app = typer.Typer(help="Build, push and list models in a model store.", no_args_is_help=True)


@app.command("make-demo")
def make_demo(
    dest: Path = typer.Argument(..., help="Directory to write the checkpoint into."),
    size: str = typer.Option(
        "tiny", help="tiny (~1 MB, tests), small, 100m, 1g, 2g or 4g (benchmarks)."
    ),
    seed: int = typer.Option(0, help="Random seed; the same seed gives the same weights."),
    arch: str | None = typer.Option(
        None,
        help="Instead of the demo Llama: a tiny random checkpoint of llama, qwen2, gemma, "
        "mixtral or phi3, built from transformers' config classes (needs transformers).",
    ),
) -> None:
    """Build a random-weight Llama checkpoint and a byte-level BPE tokenizer, offline."""
    from hydraserve.store.architectures import ARCHITECTURES, build_checkpoint
    from hydraserve.store.demo import DEMO_SIZES, make_demo_model

    setup_logging()
    if arch is not None:
        if arch not in ARCHITECTURES:
            raise typer.BadParameter(
                f"choose one of {', '.join(ARCHITECTURES)}", param_hint="--arch"
            )
        build_checkpoint(arch, dest, seed)
        console.print(f"random {arch} checkpoint written to {dest}")
        return
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
        manifest = store.push(
            src,
            name=name,
            progress=update,
            part_bytes=part_mb << 20,
            probe_cache=settings.state_dir / "layout-probes",
        )
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
    console.print(_engine_line(manifest))
    if report is not None and report.engine_note:
        console.print(
            f"[yellow]the engine could not be asked ({report.engine_note}): every tensor "
            "takes the copy path and only pipeline size 1 is offered[/]"
        )


def _engine_line(manifest: Manifest) -> str:
    if manifest.engine is None:
        return "layout from the checkpoint alone: pipeline size 1, no zero copy"
    return (
        f"zero copy: {manifest.zero_copy_share:.0%} of the bytes "
        f"({manifest.zero_copy_bytes / 1e6:.1f} MB); stages for pp "
        f"{', '.join(map(str, sorted(manifest.partitions)))} derived from {manifest.engine}"
    )


@app.command("ls")
def ls(root: str = typer.Argument(..., help="Store root: s3://bucket[/prefix] or a path.")) -> None:
    """List the models (with a complete manifest) under a store root."""
    from hydraserve.store import list_models

    settings = setup_logging()
    table = Table(
        "uri", "revision", "architecture", "layers", "size (MB)", "layout", "zero copy", "engine"
    )
    for item in list_models(root, settings.s3):
        m = item.manifest
        table.add_row(
            item.uri,
            item.revision,
            m.architecture,
            str(m.num_layers),
            f"{m.total_bytes / 1e6:.1f}",
            m.layout,
            f"{m.zero_copy_share:.0%}",
            m.engine or "-",
        )
    console.print(table)


@app.command("show")
def show(
    uri: str = typer.Argument(..., help="Model location: s3://bucket/prefix or a local path."),
    revision: str = typer.Option("main", help="Revision under the location."),
) -> None:
    """One model's manifest: size, zero-copy share and what each pipeline rank fetches."""
    from hydraserve.store import ModelRef, ModelStore

    settings = setup_logging()
    manifest = ModelStore(ModelRef(uri, revision), settings.s3).manifest()
    console.print(
        f"[bold]{manifest.name}[/]@{manifest.revision}: {manifest.architecture}, "
        f"{manifest.num_layers} layers, {manifest.total_bytes / 1e6:.1f} MB {manifest.dtype}, "
        f"layout {manifest.layout}"
    )
    console.print(_engine_line(manifest))
    table = Table("pp", "rank", "layers", "tensors", "fetch (MB)", "zero copy", "not loaded")
    sizes = {t.name: t for t in manifest.tensors}
    for pp, stages in sorted(manifest.partitions.items()):
        for stage in stages:
            members = [sizes[n] for n in stage.tensors]
            adopted = sum(t.size for t in members if t.param is not None)
            table.add_row(
                str(pp),
                str(stage.rank),
                f"{stage.start_layer}-{stage.end_layer - 1}",
                str(len(members)),
                f"{stage.nbytes / 1e6:.1f}",
                f"{adopted / max(1, sum(t.size for t in members)):.0%}",
                ", ".join(stage.unfilled) or "-",
            )
    console.print(table)
