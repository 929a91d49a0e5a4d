"""The worker's command line and environment for vLLM, read back by vLLM's own parser.

``hydraserve worker`` hands vLLM a ``serve`` command line (:func:`vllm_serve_args`) and an
environment (:func:`engine_env`). Here the command line goes through the same parser the
launcher uses and into vLLM's ``AsyncEngineArgs``, so a flag vLLM renamed or a value that
lands in the wrong setting fails here, in seconds, rather than at an engine's start.
"""

from __future__ import annotations

import importlib
import os
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hydraserve.store import ModelStore
from hydraserve.warm.protocol import ENV_CLIENT_STARTED
from hydraserve.worker.config import StageAddress, WorkerConfig
from hydraserve.worker.launcher import (
    EAGER_STAGE_WORKER,
    engine_env,
    kv_transfer_config,
    process_start_time,
    vllm_serve_args,
    with_execution_mode,
)
from hydraserve.worker.loader import LOAD_FORMAT, LoaderConfig
from hydraserve.worker.loader_config import loader_extra_config
from hydraserve.worker.plugin import register

MODEL_DIR = Path("/models/tiny/hf")
# A command line -> (vLLM's parsed namespace, its AsyncEngineArgs).
Parse = Callable[[list[str]], tuple[Namespace, Any]]


@pytest.fixture(scope="module")
def parse() -> Parse:
    """vLLM's ``serve`` parser, built as ``run_worker`` builds it."""
    import vllm.entrypoints.cli.serve as vllm_serve
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    register()
    parser = FlexibleArgumentParser(prog="hydraserve worker")
    serve = vllm_serve.ServeSubcommand()
    serve.subparser_init(parser.add_subparsers(dest="subparser"))

    def run(args: list[str]) -> tuple[Namespace, Any]:
        namespace = parser.parse_args(args)
        namespace.model = namespace.model_tag  # what `serve` does with its positional model
        return namespace, AsyncEngineArgs.from_cli_args(namespace)

    return run


def worker(**fields: object) -> WorkerConfig:
    base: dict[str, object] = {
        "model_name": "team-a/tiny",
        "uri": "s3://models/tiny",
        "revision": "r2",
        "instance": "tiny-7f3a",
        "host": "10.1.0.9",
        "port": 8123,
        "shm_dir": Path("/dev/shm/hydraserve-test"),
        "timeline": Path("/tmp/timeline.jsonl"),
    }
    return WorkerConfig.model_validate(base | fields)


def test_a_single_stage_runs_in_process_with_the_hydraserve_loader(parse: Parse) -> None:
    config = worker(kv_cache_bytes=64 << 20, max_num_batched_tokens=128, max_model_len=512)
    args, engine = parse(vllm_serve_args(config, MODEL_DIR))
    assert args.model_tag == str(MODEL_DIR) and engine.model == str(MODEL_DIR)
    assert args.served_model_name == ["team-a/tiny"]
    assert (args.host, args.port) == ("10.1.0.9", 8123)
    assert engine.load_format == LOAD_FORMAT
    # What the launcher writes is what every worker process's loader reads.
    assert engine.model_loader_extra_config == loader_extra_config(config)
    loader = LoaderConfig.model_validate(engine.model_loader_extra_config)
    assert (loader.uri, loader.revision, loader.instance) == ("s3://models/tiny", "r2", "tiny-7f3a")
    assert loader.shm_dir == "/dev/shm/hydraserve-test"
    assert loader.timeline == "/tmp/timeline.jsonl"
    assert engine.kv_cache_memory_bytes == 64 << 20
    assert (engine.max_num_batched_tokens, engine.max_model_len) == (128, 512)
    assert engine.enforce_eager is True
    assert engine.distributed_executor_backend == "uni"  # one interpreter, no engine core proc
    assert engine.pipeline_parallel_size == 1 and not args.headless
    assert args.middleware == ["hydraserve.worker.inflight.InFlightMiddleware"]
    assert engine.kv_transfer_config is None
    assert engine.disable_log_stats is True


def test_a_pipeline_stage_joins_stage_zero_through_vllms_multi_node_executor(
    parse: Parse,
) -> None:
    rendezvous = StageAddress(master_addr="10.1.0.4", master_port=29511)
    head_args, head = parse(
        vllm_serve_args(worker(pp=3, rank=0, enforce_eager=False, rendezvous=rendezvous), MODEL_DIR)
    )
    args, stage = parse(
        vllm_serve_args(worker(pp=3, rank=2, enforce_eager=False, rendezvous=rendezvous), MODEL_DIR)
    )
    for engine in (head, stage):
        assert engine.pipeline_parallel_size == 3
        assert engine.distributed_executor_backend == "mp"
        assert engine.enforce_eager is False  # asked compiled: kept
    assert (args.nnodes, args.node_rank, args.master_addr, args.master_port) == (
        3,
        2,
        "10.1.0.4",
        29511,
    )
    assert (head_args.node_rank, head_args.headless) == (0, False)
    assert args.headless is True  # only stage 0 serves HTTP ...
    assert args.middleware == []  # ... and counts in-flight requests


def test_kv_transfer_loads_hydraserves_connector_through_vllms_plugin_point(
    parse: Parse,
) -> None:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

    config = worker(kv_transfer=True, block_size=32)
    _, engine = parse(vllm_serve_args(config, MODEL_DIR))
    kv = engine.kv_transfer_config
    assert kv is not None and kv.kv_role == "kv_both"
    connector = getattr(importlib.import_module(kv.kv_connector_module_path), kv.kv_connector)
    assert issubclass(connector, KVConnectorBase_V1)
    # Saved caches live in the node's shared memory, in the instance's own KV area.
    assert kv.kv_connector_extra_config == {"store_dir": "/dev/shm/hydraserve-test/kv/tiny-7f3a"}
    assert kv_transfer_config(config)["kv_connector_extra_config"] == {
        "store_dir": str(config.shm_dir / "kv" / "tiny-7f3a")
    }
    assert engine.disable_hybrid_kv_cache_manager is True  # the connector API needs it
    assert engine.block_size == 32  # engines that exchange KV must agree on it


def test_engine_arguments_from_the_spec_come_last_and_win(parse: Parse) -> None:
    config = worker(engine_args=["--max-num-seqs", "3", "--seed", "11"])
    args = vllm_serve_args(config, MODEL_DIR)
    assert args[-4:] == ["--max-num-seqs", "3", "--seed", "11"]
    _, engine = parse(args)
    assert (engine.max_num_seqs, engine.seed) == (3, 11)


def test_engine_env_keeps_a_single_stage_in_one_process_and_pins_a_pipelines_layers(
    local_store: ModelStore,
) -> None:
    manifest = local_store.manifest()
    single = engine_env(worker(), manifest)
    assert single["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert single["HF_HUB_OFFLINE"] == "1"  # a worker never reaches for a model hub
    assert "VLLM_PP_LAYER_PARTITION" not in single
    separate = engine_env(worker(inprocess_engine=False), manifest)
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in separate
    for pp in (2, 4):
        env = engine_env(worker(pp=pp, rank=1), manifest)
        assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env
        # vLLM splits the layers exactly as the store's stages did.
        counts = [int(n) for n in env["VLLM_PP_LAYER_PARTITION"].split(",")]
        stages = [manifest.stage(pp, rank) for rank in range(pp)]
        assert counts == [s.end_layer - s.start_layer for s in stages]
        assert sum(counts) == manifest.num_layers


def test_worker_command_line_reaches_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """The flags the operator writes into a worker pod (operator/manifests.py) are the
    ``hydraserve worker`` options, and they land in the WorkerConfig it runs."""
    from typer.testing import CliRunner

    from hydraserve.cli.main import app

    seen: list[WorkerConfig] = []
    monkeypatch.setattr("hydraserve.worker.launcher.run_worker", seen.append)
    args = ["worker", "--name=m", "--uri=s3://models/m", "--pp=2", "--rank=1", "--compiled"]
    result = CliRunner().invoke(app, [*args, "--kv-transfer", "--block-size=48"])
    assert result.exit_code == 0, result.output
    (config,) = seen
    assert (config.pp, config.rank, config.enforce_eager) == (2, 1, False)
    assert config.kv_transfer is True and config.block_size == 48
    assert kv_transfer_config(config)["kv_role"] == "kv_both"

    seen.clear()
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen[0].kv_transfer is False and seen[0].block_size is None


def test_tensor_parallel_ranks_run_under_vllms_mp_executor(parse: Parse) -> None:
    """parallelism.tensor reaches vLLM as its own --tensor-parallel-size: a single stage
    with tp > 1 leaves the in-process engine for the mp executor (a process per rank); a
    pipeline stage with tp ranks joins the multi-node executor with them."""
    _, single = parse(vllm_serve_args(worker(tp=2), MODEL_DIR))
    assert (single.tensor_parallel_size, single.pipeline_parallel_size) == (2, 1)
    assert single.distributed_executor_backend == "mp"
    rendezvous = StageAddress(master_addr="10.1.0.4", master_port=29511)
    args, stage = parse(
        vllm_serve_args(worker(tp=4, pp=2, rank=1, rendezvous=rendezvous), MODEL_DIR)
    )
    assert (stage.tensor_parallel_size, stage.pipeline_parallel_size) == (4, 2)
    assert stage.distributed_executor_backend == "mp"
    # One node per stage: vLLM places the stage's tp ranks on this node.
    assert (args.nnodes, args.node_rank, args.headless) == (2, 1, True)
    # vLLM's multi-node executor counts a node's ranks by its devices: named, so the CPU
    # platform (one "device") keeps the stage's ranks together.
    assert stage.device_ids == [0, 1, 2, 3]
    _, plain = parse(vllm_serve_args(worker(), MODEL_DIR))
    assert plain.tensor_parallel_size == 1
    assert single.device_ids is None and plain.device_ids is None


@pytest.mark.parametrize("tp", [1, 2])
def test_an_eager_pipeline_stage_on_cpu_gets_the_worker_class_with_its_buffers(
    parse: Parse, tp: int
) -> None:
    """vLLM's CPU worker skips its warm-up forward when eager, and a later stage's
    intermediate-tensor buffers come from that warm-up: an eager CPU pipeline stage runs
    with HydraServe's worker class, which allocates them (decision 0105). GPUs profile
    anyway and keep vLLM's own worker."""
    for rank in (0, 1):
        stage = worker(pp=2, rank=rank, tp=tp, enforce_eager=True)
        _, on_cpu = parse(vllm_serve_args(with_execution_mode(stage, cpu=True), MODEL_DIR))
        assert on_cpu.enforce_eager is True
        assert on_cpu.worker_cls == EAGER_STAGE_WORKER[1]
        _, on_gpu = parse(vllm_serve_args(with_execution_mode(stage, cpu=False), MODEL_DIR))
        assert on_gpu.enforce_eager is True and on_gpu.worker_cls == "auto"
    single = worker(tp=tp, enforce_eager=True)
    assert with_execution_mode(single, cpu=True) == single
    # Compiled was asked (Inductor): kept, with vLLM's worker (it warms up anyway).
    inductor = with_execution_mode(worker(pp=2, tp=tp, enforce_eager=False), cpu=True)
    assert inductor.enforce_eager is False and inductor.engine_args == []
    # A model naming its own worker class: compiled with the eager backend instead, or with
    # its own compilation config when it names one too.
    own_worker = ["--worker-cls", "my.Worker"]
    theirs = with_execution_mode(worker(pp=2, tp=tp, engine_args=own_worker), cpu=True)
    _, engine = parse(vllm_serve_args(theirs, MODEL_DIR))
    assert engine.enforce_eager is False and engine.worker_cls == "my.Worker"
    assert engine.compilation_config.backend == "eager"
    own = [*own_worker, "--compilation-config", '{"backend": "inductor"}']
    mine = with_execution_mode(worker(pp=2, tp=tp, enforce_eager=True, engine_args=own), cpu=True)
    assert mine.engine_args == own and mine.enforce_eager is False


def test_engine_env_of_a_tensor_parallel_stage_leaves_multiprocessing_on(
    local_store: ModelStore,
) -> None:
    env = engine_env(worker(tp=2), local_store.manifest())
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in env


def test_worker_command_line_takes_tp(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from hydraserve.cli.main import app

    seen: list[WorkerConfig] = []
    monkeypatch.setattr("hydraserve.worker.launcher.run_worker", seen.append)
    args = ["worker", "--name=m", "--uri=s3://models/m", "--tp=4"]
    assert CliRunner().invoke(app, args).exit_code == 0
    assert seen[0].tp == 4
    assert CliRunner().invoke(app, [*args[:-1], "--tp=9"]).exit_code != 0


def test_the_context_length_never_exceeds_the_models_own(parse: Parse, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 512}')
    _, engine = parse(vllm_serve_args(worker(max_model_len=1024), tmp_path))
    assert engine.max_model_len == 512
    _, engine = parse(vllm_serve_args(worker(max_model_len=256), tmp_path))
    assert engine.max_model_len == 256
    _, engine = parse(vllm_serve_args(worker(max_model_len=1024), MODEL_DIR))  # no config
    assert engine.max_model_len == 1024


def test_the_eager_compile_backend_survives_the_cpu_platform(
    parse: Parse, demo_checkpoint: Path
) -> None:
    """What vLLM's CPU platform makes of the stage's compilation config: its own
    ``check_and_update_config`` swaps a named backend for Inductor in the default mode, so
    the stage must name the mode too, or it pays Inductor's code generation at every start."""
    import json

    from vllm.config import CompilationMode

    from hydraserve.worker.launcher import EAGER_COMPILE_BACKEND

    def compilation(extra: list[str]) -> Any:
        args = ["serve", str(demo_checkpoint), "--max-model-len", "256", *extra]
        _, engine = parse(args)
        return engine.create_engine_config().compilation_config

    ours = compilation(EAGER_COMPILE_BACKEND)
    assert (ours.mode, ours.backend) == (CompilationMode.DYNAMO_TRACE_ONCE, "eager")
    # The backend alone is overridden (why EAGER_COMPILATION names the mode).
    bare = compilation(["--compilation-config", json.dumps({"backend": "eager"})])
    assert bare.backend == "inductor"


def test_a_warm_childs_start_counts_from_its_client_and_the_note_is_not_inherited(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import psutil

    created = psutil.Process().create_time()
    # A client that waited 8 s for a preloading runtime: the start counts from the client.
    monkeypatch.setenv(ENV_CLIENT_STARTED, repr(created - 8.0))
    assert process_start_time() == pytest.approx(created - 8.0)
    assert ENV_CLIENT_STARTED not in os.environ  # taken out: nothing this one starts sees it
    # Without the note, or with one that is not a time or is later: the process's creation.
    assert process_start_time() == pytest.approx(created)
    monkeypatch.setenv(ENV_CLIENT_STARTED, "soon")
    assert process_start_time() == pytest.approx(created)
    monkeypatch.setenv(ENV_CLIENT_STARTED, repr(created + 5.0))
    assert process_start_time() == pytest.approx(created)
