"""``hydraserve worker``: one pipeline stage of one model instance (vLLM + HydraServe loader)."""

from __future__ import annotations

from pathlib import Path

import typer

from hydraserve.cli.common import setup_logging


def worker(
    uri: str = typer.Option(None, help="Model location in the store (s3://… or a path)."),
    name: str = typer.Option(None, help="Served model name (the OpenAI `model`)."),
    revision: str = typer.Option("main"),
    instance: str = typer.Option("local-0", help="Instance id shared by the pipeline's stages."),
    pp: int = typer.Option(1, min=1, max=4, help="Pipeline size of the instance."),
    rank: int = typer.Option(0, min=0, max=3, help="This stage's rank (0 serves HTTP)."),
    tp: int = typer.Option(1, min=1, max=8, help="Tensor-parallel GPUs of this stage."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8100),
    master_addr: str = typer.Option("127.0.0.1", help="Address of stage 0 (rendezvous)."),
    master_port: int = typer.Option(29500),
    prefetcher: str | None = typer.Option(None, help="Node prefetcher URL; default: fetch here."),
    timeline: Path | None = typer.Option(None, help="Append cold-start stage events here."),
    compiled: bool = typer.Option(False, help="Compiled mode instead of --enforce-eager."),
    config: Path | None = typer.Option(None, help="A WorkerConfig JSON file (overrides flags)."),
    engine_arg: list[str] = typer.Option([], help="Extra vLLM argument (repeatable)."),
    kv_transfer: bool = typer.Option(
        False, help="Load HydraServe's KV connector (requests can move here by KV transfer)."
    ),
    block_size: int | None = typer.Option(
        None, min=16, help="KV block size; engines that exchange KV must agree on it."
    ),
    kv_area: str | None = typer.Option(
        None, help="KV hand-over area under <shm>/kv (default: the instance's own)."
    ),
) -> None:
    """Run one stage of a model instance: fetch (or wait for) its bytes, start vLLM, serve."""
    from hydraserve.worker.config import StageAddress, WorkerConfig
    from hydraserve.worker.launcher import run_worker

    setup_logging()
    if config is not None:
        worker_config = WorkerConfig.model_validate_json(config.read_text())
    else:
        if not uri or not name:
            raise typer.BadParameter("--uri and --name are required (or pass --config)")
        worker_config = WorkerConfig(
            model_name=name,
            uri=uri,
            revision=revision,
            instance=instance,
            pp=pp,
            rank=rank,
            tp=tp,
            host=host,
            port=port,
            prefetcher_url=prefetcher,
            timeline=timeline,
            rendezvous=StageAddress(master_addr=master_addr, master_port=master_port),
            enforce_eager=not compiled,
            engine_args=engine_arg,
            kv_transfer=kv_transfer,
            block_size=block_size,
            kv_area=kv_area,
        )
    run_worker(worker_config)
