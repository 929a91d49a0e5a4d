"""``hydraserve worker``: prepare a stage's bytes, then run vLLM with the HydraServe loader.

Order matters for cold-start latency: the fetch starts (or is confirmed started by the node
prefetcher) *before* the ~8 s vLLM import, so bytes flow while the runtime loads; the
loader then adopts tensors as the verified watermark passes them.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from hydraserve.logs import get_logger
from hydraserve.prefetcher.fetcher import RangeFetcher
from hydraserve.prefetcher.shm import (
    FetchState,
    ModelShm,
    fetch_name,
    kv_area_dir,
    write_json_atomic,
)
from hydraserve.settings import CommonSettings
from hydraserve.store import Manifest, ModelRef, ModelStore
from hydraserve.warm.protocol import ENV_CLIENT_STARTED, ENV_SOCKET
from hydraserve.worker.artifacts import artifact_key, cache_files, publish, restore
from hydraserve.worker.config import WorkerConfig
from hydraserve.worker.loader_config import loader_extra_config
from hydraserve.worker.timeline import Timeline

log = get_logger("worker")

# What a worker imports before its engine starts: a node's warm runtime (decision 0600)
# imports the same, so a worker forked from it finds them loaded.
ENGINE_IMPORTS = (
    "torch",
    "vllm.entrypoints.cli.serve",
    "vllm.entrypoints.serve.utils.api_utils",
    "vllm.logger",
    "vllm.platforms",
    "vllm.utils.argparse_utils",
    "vllm.v1.engine.async_llm",
    "vllm.v1.engine.core",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.cpu_worker",
    "hydraserve.worker.loader",
    "hydraserve.worker.kv_connector",
)
# What a node's warm runtime does before it forks a worker (decision 0600): the engine's
# imports, the worker's own command, and the store client's data files.
WARM_PRELOAD = (
    *ENGINE_IMPORTS,
    "hydraserve.cli.main",
    "hydraserve.store.backends:preload_s3_client",
)
# Environment every engine process runs with, read by some libraries when imported:
# a warm runtime is started with it too.
STATIC_ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# A warm runtime's environment. OpenMP (libgomp) reads OMP_NUM_THREADS once, when torch
# loads it in the runtime, so the value vLLM sets for each worker from its core binding
# comes too late in a forked child: a thread that does not set its own count gets this
# default. With the machine's core count there, a pipeline stage bound to one core ran
# its forward with a second OpenMP thread spinning on that same core (pp 2 TPOT ~310 ms
# instead of ~15 ms). The thread vLLM binds still sets its own count (decision 0600).
WARM_RUNTIME_ENV = {**STATIC_ENGINE_ENV, "OMP_NUM_THREADS": "1"}


def process_start_time() -> float:
    """Wall-clock time this process was created (so interpreter start-up is counted); for a
    warm child, when its client started, if earlier (so a wait for a runtime that is still
    preloading is counted too). Takes the client's note out of the environment, so no
    process this one starts inherits it."""
    client_started = os.environ.pop(ENV_CLIENT_STARTED, None)
    try:
        import psutil

        created = float(psutil.Process().create_time())
    except Exception:  # psutil is optional outside the engine image
        created = time.time()
    try:
        return min(created, float(client_started)) if client_started else created
    except ValueError:  # not a time: ignore it
        return created


def ensure_fetch(config: WorkerConfig, store: ModelStore, manifest: Manifest) -> None:
    """Make sure this stage's bytes are on their way into shared memory.

    Asks the node prefetcher when there is one; otherwise fetches in a background thread of
    this process, unless a fetch of these bytes is already running or done on this node.
    """
    shm = ModelShm(config.shm_dir, config.uri, config.revision)
    stage_pp = config.pp if config.pp > 1 else None
    stage_rank = config.rank if config.pp > 1 else None
    name = fetch_name(stage_pp, stage_rank)
    if config.prefetcher_url:
        # The prefetcher writes the node's copy; this worker may see it read-only.
        body = {"uri": config.uri, "revision": config.revision, "pp": stage_pp, "rank": stage_rank}
        resp = httpx.post(f"{config.prefetcher_url}/v1/preload", json=body, timeout=30)
        resp.raise_for_status()
        return
    shm.dir.mkdir(parents=True, exist_ok=True)
    if not shm.manifest_path.exists():
        write_json_atomic(shm.manifest_path, manifest.model_dump(mode="json"))
    for candidate in (name, fetch_name(None, None)):
        status = shm.read_status(candidate)
        if status is not None and status.state in (FetchState.FETCHING, FetchState.DONE):
            log.info("fetch.reuse", model=config.model_name, fetch=candidate, state=status.state)
            return
    ranges = manifest.fetch_ranges(stage_pp, stage_rank)
    fetcher = RangeFetcher(store, manifest, shm, name, ranges)
    shm.write_status(name, fetcher.status.model_copy(update={"state": FetchState.FETCHING}))
    threading.Thread(target=_run_quietly, args=(fetcher,), name="self-fetch", daemon=True).start()


def _run_quietly(fetcher: RangeFetcher) -> None:
    # A failure is published in the fetch's state file, and the loader reports it.
    with contextlib.suppress(Exception):
        fetcher.run()


def prepare_model_dir(config: WorkerConfig, store: ModelStore) -> Path:
    """Config and tokenizer files in a local directory, which vLLM takes as ``--model``."""
    shm = ModelShm(config.shm_dir, config.uri, config.revision)
    if os.access(shm.dir, os.W_OK):
        return store.download_side_files(shm.dir / "hf")
    # The node's copy is mounted read-only (a tenant's worker): keep them privately.
    return store.download_side_files(Path(tempfile.gettempdir()) / "hydraserve-hf" / shm.dir.name)


def context_length(wanted: int, model_dir: Path) -> int:
    """The platform's context length, no longer than the model's own (vLLM refuses to start
    with more than its config allows)."""
    try:
        own = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        own = None
    return min(wanted, int(own)) if isinstance(own, int | float) and own > 0 else wanted


def vllm_serve_args(config: WorkerConfig, model_dir: Path) -> list[str]:
    extra = loader_extra_config(config)
    args = [
        "serve",
        str(model_dir),
        "--served-model-name",
        config.model_name,
        "--load-format",
        "hydraserve",
        "--model-loader-extra-config",
        json.dumps(extra),
        "--host",
        config.host,
        "--port",
        str(config.port),
        "--max-model-len",
        str(context_length(config.max_model_len, model_dir)),
        "--max-num-batched-tokens",
        str(config.max_num_batched_tokens),
        "--max-num-seqs",
        str(config.max_num_seqs),
        "--kv-cache-memory-bytes",
        str(config.kv_cache_bytes),
        "--disable-log-stats",
        "--uvicorn-log-level",
        "warning",
    ]
    if config.enforce_eager:
        args.append("--enforce-eager")
    if config.rank == 0:
        # Counts the requests this instance serves, for draining (GET /hydraserve/inflight).
        args += ["--middleware", "hydraserve.worker.inflight.InFlightMiddleware"]
    if config.block_size is not None:
        args += ["--block-size", str(config.block_size)]
    if config.kv_transfer:
        args += ["--kv-transfer-config", json.dumps(kv_transfer_config(config))]
        args.append("--disable-hybrid-kv-cache-manager")  # the connector API requires it
    if config.tp > 1:
        args += ["--tensor-parallel-size", str(config.tp)]
    if in_process(config):
        args += ["--distributed-executor-backend", "uni"]
    elif config.pp == 1 and config.tp > 1:
        args += ["--distributed-executor-backend", "mp"]  # a process per tensor rank
    if config.pp > 1 and config.tp > 1:
        # vLLM's multi-node executor finds a node's own ranks by how many devices a node
        # has; the CPU platform reports one, which splits a stage's tensor ranks over
        # "nodes". Naming the stage's devices (indices into what the pod sees: right on
        # GPUs too) keeps them together.
        args += ["--device-ids", ",".join(str(i) for i in range(config.tp))]
    if config.pp > 1:
        args += [
            "--pipeline-parallel-size",
            str(config.pp),
            "--distributed-executor-backend",
            "mp",
            "--nnodes",
            str(config.pp),
            "--node-rank",
            str(config.rank),
            "--master-addr",
            config.rendezvous.master_addr,
            "--master-port",
            str(config.rendezvous.master_port),
        ]
        if config.rank > 0:
            args.append("--headless")
    return args + list(config.engine_args)


# torch.compile's "eager" backend: graph capture by Dynamo (once), then the captured
# operations run as they are, without Inductor's code generation. The mode must be named:
# in vLLM's default mode (VLLM_COMPILE) the CPU platform replaces the backend with Inductor
# (vllm/platforms/cpu.py), so ``{"backend": "eager"}`` alone still runs Inductor. Mode 2 is
# ``CompilationMode.DYNAMO_TRACE_ONCE``, the mode that platform itself switches to.
EAGER_COMPILATION: dict[str, object] = {"mode": 2, "backend": "eager"}
EAGER_COMPILE_BACKEND = ["--compilation-config", json.dumps(EAGER_COMPILATION)]
# vLLM's CPU worker with the buffers an eager pipeline stage lacks (decision 0105).
EAGER_STAGE_WORKER = ["--worker-cls", "hydraserve.worker.cpu_stage_worker.EagerPipelineStageWorker"]


def _names(engine_args: list[str], *flags: str) -> bool:
    return any(arg in flags or arg.startswith(tuple(f"{f}=" for f in flags)) for arg in engine_args)


def with_execution_mode(config: WorkerConfig, cpu: bool) -> WorkerConfig:
    """The config this stage runs with.

    vLLM's CPU worker allocates a later pipeline rank's intermediate-tensor buffers only in
    its compiled-mode warm-up forward, so an eager CPU pipeline stage (pp > 1) would fail on
    its first request (``assert self.intermediate_tensors is not None``, with or without
    tensor ranks). Such a stage runs eager with HydraServe's worker class
    (:data:`EAGER_STAGE_WORKER`, vLLM's ``--worker-cls``), which allocates them without the
    warm-up. A model whose engine arguments name their own worker class instead runs
    compiled with torch.compile's ``eager`` backend (:data:`EAGER_COMPILATION`, unless they
    also name a compilation config): the same numerics, at the cost of a graph capture and
    a dummy forward. GPU workers always profile, so they keep the mode they were given
    (decision 0105, addenda)."""
    if not (cpu and config.pp > 1 and config.enforce_eager):
        return config
    if not _names(config.engine_args, "--worker-cls"):
        return config.model_copy(update={"engine_args": [*config.engine_args, *EAGER_STAGE_WORKER]})
    chosen = _names(config.engine_args, "-cc", "--compilation-config") or any(
        arg.startswith("-O") for arg in config.engine_args
    )
    engine_args = config.engine_args if chosen else [*config.engine_args, *EAGER_COMPILE_BACKEND]
    return config.model_copy(update={"enforce_eager": False, "engine_args": engine_args})


def in_process(config: WorkerConfig) -> bool:
    """Whether the engine runs in the API process (decision 0003): one stage, one rank."""
    return config.pp == 1 and config.tp == 1 and config.inprocess_engine


def kv_transfer_config(config: WorkerConfig) -> dict[str, object]:
    """vLLM's ``--kv-transfer-config`` for HydraServe's connector (requests moving between
    engines of this node save and load KV through its shared memory)."""
    return {
        "kv_connector": "HydraServeKVConnector",
        "kv_connector_module_path": "hydraserve.worker.kv_connector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "store_dir": str(kv_area_dir(config.shm_dir, config.kv_area or config.instance))
        },
    }


def engine_env(config: WorkerConfig, manifest: Manifest) -> dict[str, str]:
    env = dict(STATIC_ENGINE_ENV)
    if in_process(config):
        # One interpreter instead of three: the engine core and the model runner stay in
        # this process, which saves two ~8 s import chains on the cold-start path.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if config.pp > 1:
        # vLLM must split layers exactly as the store's partition did.
        env["VLLM_PP_LAYER_PARTITION"] = ",".join(map(str, manifest.layer_partition(config.pp)))
    return env


def _wait_healthy(url: str) -> None:
    with httpx.Client(timeout=2) as client:
        while True:
            try:
                if client.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)


def _watch_ready(
    config: WorkerConfig, timeline: Timeline, since: float, after_ready: Callable[[], None]
) -> None:
    """Once the instance answers (rank 0 serves its API): record engine_init (rank 0),
    then run ``after_ready``."""
    host = config.host if config.rank == 0 else config.rendezvous.master_addr
    _wait_healthy(f"http://{host}:{config.port}/health")
    if config.rank == 0:
        timeline.record("engine_init", since, time.time())
    after_ready()


# Flags whose values differ between starts of the same stage without changing what the
# engine compiles (addresses, ports, this start's instance, shared-memory and KV paths):
# left out of the artifact key.
_PER_START_FLAGS = {
    "--host",
    "--port",
    "--master-addr",
    "--master-port",
    "--served-model-name",
    "--model-loader-extra-config",
    "--kv-transfer-config",
}


def stage_flags(serve_args: list[str]) -> list[str]:
    """The engine flags of a stage without the per-start ones (addresses, ports)."""
    kept: list[str] = []
    skip = False
    for arg in serve_args:
        if skip:
            skip = False
            continue
        if arg in _PER_START_FLAGS:
            skip = True
            continue
        kept.append(arg)
    return kept


def compile_cache_root() -> Path:
    """Where vLLM keeps its caches in this process (``VLLM_CACHE_ROOT``)."""
    import vllm.envs

    return Path(vllm.envs.VLLM_CACHE_ROOT).expanduser()


def _share_artifacts(
    config: WorkerConfig,
    store: ModelStore,
    serve_args: list[str],
    timeline: Timeline,
    platform: Any,
) -> Callable[[], None]:
    """Before the engine starts: unpack this stage's compile artifact from the store into
    the compile cache. Returns what to do once the instance is ready: store the artifact
    if this start compiled (decision 0601)."""
    scope = config.artifact_scope
    if scope is None:
        return lambda: None
    import vllm

    engine = f"vllm {vllm.__version__}"
    key = artifact_key(
        engine, platform.device_type, stage_flags(serve_args), config.pp, config.rank
    )
    cache_root = compile_cache_root()
    with timeline.stage("artifacts", key=key) as details:
        restored = restore(store, scope, key, cache_root)
        details.update(state=restored.state, files=restored.files, bytes=restored.size)
    before = cache_files(cache_root)

    def after_ready() -> None:
        try:
            publish(
                store, scope, key, engine, cache_root, before, restored, config.artifact_max_bytes
            )
        except Exception as exc:  # serving goes on; the next start compiles again
            log.warning("artifacts.publish_failed", key=key, scope=scope, error=str(exc))

    return after_ready


def run_worker(config: WorkerConfig) -> None:
    """Run one stage until the engine exits."""
    settings = CommonSettings()
    proc_start = process_start_time()
    timeline = Timeline(
        config.timeline, model=config.model_name, instance=config.instance, rank=config.rank
    )
    timeline.record("process_start", proc_start, time.time())
    with timeline.stage("manifest"):
        store = ModelStore(ModelRef(config.uri, config.revision), settings.s3)
        manifest = store.manifest()
    with timeline.stage("fetch_start"):
        ensure_fetch(config, store, manifest)
        model_dir = prepare_model_dir(config, store)
    os.environ.update(engine_env(config, manifest))
    # Forked from a node's warm runtime, the engine is already imported (decision 0600).
    warm = "vllm.v1.engine.core" in sys.modules
    with timeline.stage("imports", warm=warm, runtime=os.environ.get(ENV_SOCKET)):
        for module in ENGINE_IMPORTS:
            with contextlib.suppress(ImportError):  # e.g. the CPU worker on a GPU image
                importlib.import_module(module)
        import vllm.entrypoints.cli.serve as vllm_serve
        from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
        from vllm.logger import configure_logging_from_args
        from vllm.platforms import current_platform
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    resolved = with_execution_mode(config, current_platform.is_cpu())
    if resolved.enforce_eager != config.enforce_eager:
        log.info(
            "worker.compiled_pipeline_stage",
            model=config.model_name,
            instance=config.instance,
            rank=config.rank,
            pp=config.pp,
            tp=config.tp,
            reason="the model's engine arguments name their own worker class, which may "
            "lack the intermediate-tensor buffers of an eager CPU pipeline stage",
        )
    config = resolved
    serve_args = vllm_serve_args(config, model_dir)
    after_ready = _share_artifacts(config, store, serve_args, timeline, current_platform)
    engine_start = time.time()
    threading.Thread(
        target=_watch_ready, args=(config, timeline, engine_start, after_ready), daemon=True
    ).start()
    cli_env_setup()
    parser = FlexibleArgumentParser(prog="hydraserve worker")
    subparsers = parser.add_subparsers(dest="subparser")
    serve = vllm_serve.ServeSubcommand()
    serve.subparser_init(subparsers)
    args = parser.parse_args(serve_args)
    configure_logging_from_args(args)
    serve.validate(args)
    log.info(
        "worker.engine_start",
        model=config.model_name,
        instance=config.instance,
        rank=config.rank,
        pp=config.pp,
        tp=config.tp,
        port=config.port,
    )
    serve.cmd(args)
