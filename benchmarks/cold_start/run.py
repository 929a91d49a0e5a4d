"""Cold-start benchmark (the paper's Fig. 7) on an emulated cluster of this machine.

Nodes are network namespaces whose links to the store are shaped to a link rate; the model
store is an S3 server in its own namespace. For each link rate (``--rates``), it measures
the cold time-to-first-token and its stage breakdown of:

(a) serverless vLLM: download the whole checkpoint to the node, then start stock vLLM with
    the flags its users would set (eager, small batch and KV sizes);
(c) HydraServe pp 1: prefetch starts with placement, the worker overlaps start-up with it;
(d) HydraServe pp 2 and 4: each node fetches only its stage.

Once per run (the bytes are local, so the link rate does not matter) it measures:
(b) ServerlessLLM-style: the checkpoint already on the node, stock vLLM starts from it;
the engine-ready floor per pipeline size (HydraServe with all bytes local), first as the
first start of the model anywhere (it compiles and stores its compile artifacts beside the
model, decision 0601), then as every later start (it loads them).

Cache state: every scenario starts with an empty vLLM cache on every node (compile cache
and model-class probe), for every system; the only thing carried between scenarios is what
HydraServe itself ships with the model (its compile artifacts in the store). HydraServe's
workers are forked from each node's warm runtime (decision 0600), which is started with
the node, like its prefetcher. Reports the median and the min-max over ``--repeats`` runs,
the ratio F/E (fetching the model over one link / stock vLLM's engine start) per rate, and
each pipeline's TTFT over its physical bound ``max(bytes / (pp x link rate), floor)``; a
ratio below 1 breaks physics, and the run fails. Writes
``benchmarks/results/cold_start.json``, a timeline chart ``cold_start.png`` and, for more
than one rate, ``cold_start_sweep.png`` (TTFT against link rate per system).

Run as root: ``.venv/bin/python -m benchmarks.cold_start.run --size 1g --rates 25 50 100 200``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.cold_start.fidelity import fidelity
from benchmarks.common import RESULTS_DIR, machine_info, write_result
from hydraserve.emulation.netns import EmulatedCluster, EmulatedNode
from hydraserve.logs import configure_logging, get_logger
from hydraserve.prefetcher.fetcher import RangeFetcher
from hydraserve.prefetcher.shm import ModelShm, write_json_atomic
from hydraserve.settings import S3Settings
from hydraserve.store import Manifest, ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model
from hydraserve.store.manifest import WEIGHTS_NAME
from hydraserve.warm.client import write_shim
from hydraserve.warm.protocol import ENV_SOCKET
from hydraserve.worker.config import StageAddress, WorkerConfig
from hydraserve.worker.launcher import WARM_PRELOAD, WARM_RUNTIME_ENV
from hydraserve.worker.timeline import read_timeline

log = get_logger("bench.cold_start")

MODEL_URI = "s3://models/bench"
WORKER_PORT = 8100
MASTER_PORT = 29500
PROMPT = "Once upon a time"
RANGE_BYTES = 64 << 20


@dataclass(frozen=True)
class Served:
    """A model the benchmark serves: where it is stored, where its instance listens."""

    uri: str = MODEL_URI
    port: int = WORKER_PORT
    master_port: int = MASTER_PORT

    @property
    def name(self) -> str:
        return self.uri.rsplit("/", 1)[-1]


PRIMARY = Served()
# The contended case's second model: the same bytes stored under another name.
CONTENDER = Served("s3://models/bench-b", WORKER_PORT + 1, MASTER_PORT + 1)


@dataclass
class Scenario:
    name: str
    kind: str  # "serverless-vllm", "local-vllm", "first", "floor", "hydraserve"
    pp: int = 1

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


@dataclass
class Outcome:
    name: str
    pp: int
    ttft_s: float
    ready_s: float
    stages: dict[str, list[float]] = field(default_factory=dict)  # stage -> [start, end]
    first_token_text: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "pp": self.pp,
            "ttft_s": round(self.ttft_s, 3),
            "ready_s": round(self.ready_s, 3),
            "stages": {k: [round(v[0], 3), round(v[1], 3)] for k, v in self.stages.items()},
        }


class Bench:
    def __init__(self, cluster: EmulatedCluster, manifest: Manifest, args: argparse.Namespace):
        self.cluster = cluster
        self.manifest = manifest
        self.args = args
        self.work = Path(args.work_dir)
        self.http = httpx.Client(timeout=30)
        self.local_store = ModelStore(ModelRef(str(self.work / "store-local" / "bench")))
        if not self.local_store.backend.exists("manifest.json"):
            self.local_store.push(Path(args.checkpoint))
        self.store = ModelStore(ModelRef(MODEL_URI), S3Settings(endpoint_url=cluster.s3_endpoint))
        self.cache_dir = self.work / "caches" / "none"
        self.shim = write_shim(self.work / "warm-python")
        self.warm: dict[str, str] = {}  # node -> its warm runtime's name

    def start_warm_runtimes(self) -> None:
        """A warm runtime per node, started with the node (decision 0600)."""
        for node in self.cluster.node_list:
            name = f"bench-{node.name}"
            log_path = self.work / "logs" / f"warm-{node.name}.log"
            log_path.unlink(missing_ok=True)
            preload = [arg for entry in WARM_PRELOAD for arg in ("--preload", entry)]
            self.cluster.spawn(
                node.ns,
                [
                    *(sys.executable, "-m", "hydraserve.warm.server", "--name", name),
                    *("--shim", str(self.shim), *preload),
                ],
                env={**self.node_env(node, 1), **WARM_RUNTIME_ENV},
                log_name=f"warm-{node.name}",
            )
            self.warm[node.name] = name
        deadline = time.time() + 300
        for node in self.cluster.node_list:
            log_path = self.work / "logs" / f"warm-{node.name}.log"
            while "warm.ready" not in (log_path.read_text() if log_path.exists() else ""):
                if time.time() > deadline:
                    raise TimeoutError(f"warm runtime of {node.name} not ready")
                time.sleep(0.2)

    # -- node helpers ------------------------------------------------------------------

    def node_env(self, node: EmulatedNode, pp: int) -> dict[str, str]:
        env = {
            "HYDRASERVE_S3__ENDPOINT_URL": self.cluster.s3_endpoint,
            "HYDRASERVE_SHM_DIR": str(node.shm_dir),
            "VLLM_HOST_IP": node.ip,
            "GLOO_SOCKET_IFNAME": node.iface,
            # Each node's own cache, empty at the start of every scenario.
            "VLLM_CACHE_ROOT": str(self.cache_dir / node.name),
            "VLLM_USE_AOT_COMPILE": "0",
            "HF_HUB_OFFLINE": "1",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "PYTHONUNBUFFERED": "1",
        }
        if pp > 1:
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(node.index % (os.cpu_count() or 1))
        return env

    def reset(self) -> None:
        """Forget every byte on every node (and stop stray workers)."""
        for node in self.cluster.node_list:
            status = self.http.get(f"{node.prefetcher_url}/v1/status").json()
            for model in status["models"]:
                self.http.post(
                    f"{node.prefetcher_url}/v1/evict",
                    json={"uri": model["uri"], "revision": model["revision"]},
                )
            # Bytes the prefetcher never heard of (a seeded cache) go too.
            for uri in (PRIMARY.uri, CONTENDER.uri):
                shutil.rmtree(ModelShm(node.shm_dir, uri, "main").dir, ignore_errors=True)
        shutil.rmtree(self.work / "nodes", ignore_errors=True)
        subprocess.run(["sync"], check=False)

    def preload(
        self, node: EmulatedNode, pp: int | None, rank: int | None, served: Served = PRIMARY
    ) -> None:
        body = {"uri": served.uri, "revision": "main", "pp": pp, "rank": rank}
        self.http.post(f"{node.prefetcher_url}/v1/preload", json=body).raise_for_status()

    def seed_cache(
        self,
        node: EmulatedNode,
        name: str,
        pp: int | None,
        rank: int | None,
        served: Served = PRIMARY,
    ) -> None:
        """Put a stage's bytes into a node's shared memory as its cache would hold them,
        copied from a local copy of the store (a cache is filled in the past, not over the
        benchmark's shaped link)."""
        shm = ModelShm(node.shm_dir, served.uri, "main")
        shm.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(shm.manifest_path, self.manifest.model_dump(mode="json"))
        ranges = self.manifest.fetch_ranges(pp, rank)
        RangeFetcher(self.local_store, self.manifest, shm, name, ranges).run()

    def fetch_status(
        self, node: EmulatedNode, name: str, served: Served = PRIMARY
    ) -> dict[str, Any] | None:
        status = self.http.get(f"{node.prefetcher_url}/v1/status").json()
        for model in status["models"]:
            if model["uri"] == served.uri:
                fetch: dict[str, Any] | None = model["fetches"].get(name)
                return fetch
        return None

    def wait_fetched(self, nodes: list[tuple[EmulatedNode, str]], timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            states = [self.fetch_status(n, name) for n, name in nodes]
            if any(s and s["state"] == "failed" for s in states):
                raise RuntimeError(f"a fetch failed: {states}")
            if all(s and s["state"] == "done" for s in states):
                return
            time.sleep(0.1)
        raise TimeoutError("fetches did not finish")

    def start_workers(
        self, pp: int, timeline: Path, eager: bool, served: Served = PRIMARY
    ) -> list[subprocess.Popen[bytes]]:
        nodes = self.cluster.node_list
        procs = []
        for rank in range(pp):
            node = nodes[rank]
            config = WorkerConfig(
                model_name=served.name,
                uri=served.uri,
                instance=f"{served.name}-pp{pp}",
                pp=pp,
                rank=rank,
                host=node.ip,
                port=served.port,
                rendezvous=StageAddress(master_addr=nodes[0].ip, master_port=served.master_port),
                prefetcher_url=node.prefetcher_url,
                shm_dir=node.shm_dir,
                timeline=timeline,
                enforce_eager=eager,
                max_model_len=512,
                kv_cache_bytes=128 << 20,
                artifact_scope="bench",
            )
            path = self.work / f"worker-{served.name}-pp{pp}-rank{rank}.json"
            path.write_text(config.model_dump_json())
            runtime = self.warm.get(node.name)
            python = str(self.shim) if runtime else sys.executable
            env = self.node_env(node, pp) | ({ENV_SOCKET: runtime} if runtime else {})
            procs.append(
                self.cluster.spawn(
                    node.ns,
                    [python, "-m", "hydraserve.cli.main", "worker", "--config", str(path)],
                    env=env,
                    log_name=f"worker-{served.name}-pp{pp}-rank{rank}",
                )
            )
        return procs

    def wait_ready(
        self,
        procs: list[subprocess.Popen[bytes]],
        fetches: list[tuple[EmulatedNode, str]],
        served: Served = PRIMARY,
    ) -> float:
        """Time when stage 0 answers /health and every stage's bytes are verified."""
        url = f"http://{self.cluster.node_list[0].ip}:{served.port}/health"
        deadline = time.time() + self.args.timeout
        while time.time() < deadline:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"a worker exited with {proc.returncode}; see logs")
            try:
                healthy = self.http.get(url, timeout=1).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and all(
                (s := self.fetch_status(n, name, served)) and s["state"] == "done"
                for n, name in fetches
            ):
                return time.time()
            time.sleep(0.05)
        raise TimeoutError("instance not ready")

    def first_token(self, t0: float, served: Served = PRIMARY) -> tuple[float, str]:
        url = f"http://{self.cluster.node_list[0].ip}:{served.port}/v1/completions"
        body = {
            "model": served.name,
            "prompt": PROMPT,
            "max_tokens": 4,
            "temperature": 0,
            "stream": True,
        }
        with self.http.stream("POST", url, json=body, timeout=120) as resp:
            resp.raise_for_status()
            for line in resp.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[len("data: ") :])
                    return time.time() - t0, chunk["choices"][0]["text"]
        raise RuntimeError("no token streamed")

    def stop(self, procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            self.cluster.kill(proc)
        time.sleep(1.0)

    # -- scenarios -----------------------------------------------------------------------

    def run(self, scenario: Scenario, repeat: int) -> Outcome:
        self.reset()
        # Every node's vLLM cache empty, for every system; only the store carries state.
        self.cache_dir = self.work / "caches" / f"{scenario.slug}-{repeat}"
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        if scenario.kind == "first":
            self.store.backend.delete_prefix("artifacts/")
        log.info("scenario.start", scenario=scenario.name, repeat=repeat)
        if scenario.kind in ("serverless-vllm", "local-vllm"):
            return self.serverless_vllm(scenario)
        return self.hydraserve(scenario)

    def hydraserve(self, scenario: Scenario) -> Outcome:
        pp = scenario.pp
        nodes = self.cluster.node_list[:pp]
        names = ["full" if pp == 1 else f"pp{pp}-rank{r}" for r in range(pp)]
        preload_first = scenario.kind in ("first", "floor")
        if preload_first:
            # Bytes already on the nodes (host-memory cache): no network on the cold path.
            for rank, (node, name) in enumerate(zip(nodes, names, strict=True)):
                self.seed_cache(node, name, pp if pp > 1 else None, rank if pp > 1 else None)
        timeline = self.work / f"timeline-{scenario.name}.jsonl"
        timeline.unlink(missing_ok=True)
        t0 = time.time()
        if not preload_first:
            # Placement is known: every node starts pulling its stage before any pod exists.
            for rank, node in enumerate(nodes):
                self.preload(node, pp if pp > 1 else None, rank if pp > 1 else None)
        # As `hydraserve up` asks by default: eager (a CPU pipeline stage with HydraServe's
        # worker class); --inductor: pipeline stages compile with Inductor.
        procs = self.start_workers(pp, timeline, eager=pp == 1 or not self.args.inductor)
        try:
            ready = self.wait_ready(procs, list(zip(nodes, names, strict=True)))
            ttft, text = self.first_token(t0)
        finally:
            self.stop(procs)
        stages: dict[str, list[float]] = {}
        if not preload_first:
            for rank, (node, name) in enumerate(zip(nodes, names, strict=True)):
                status = self.fetch_status(node, name) or {}
                if status.get("started_at") and status.get("finished_at"):
                    stages[f"fetch[{rank}]"] = [
                        status["started_at"] - t0,
                        status["finished_at"] - t0,
                    ]
        for event in read_timeline(timeline):
            key = f"{event['stage']}[{event.get('rank', 0)}]"
            stages[key] = [event["start"] - t0, event["end"] - t0]
        stages["first_token"] = [ready - t0, ttft]
        return Outcome(scenario.name, pp, ttft, ready - t0, stages, text)

    def first_start(self, pp: int, served: Served) -> None:
        """Start a model once with its bytes local, so its compile artifacts (and model
        inspection) are in the store like the primary model's (decision 0601)."""
        nodes = self.cluster.node_list[:pp]
        names = [f"pp{pp}-rank{rank}" for rank in range(pp)]
        for rank, (node, name) in enumerate(zip(nodes, names, strict=True)):
            self.seed_cache(node, name, pp, rank, served)
        timeline = self.work / f"timeline-first-{served.name}.jsonl"
        procs = self.start_workers(pp, timeline, eager=True, served=served)
        try:
            self.wait_ready(procs, list(zip(nodes, names, strict=True)), served)
            self.first_token(time.time(), served)
        finally:
            self.stop(procs)

    def contended(self, pp: int, repeat: int) -> dict[str, Any]:
        """Two models cold-start at once as pp-stage pipelines on the same nodes, so every
        node's link carries a stage of each (and its cores run both engines)."""
        self.reset()
        self.cache_dir = self.work / "caches" / f"contended-{repeat}"
        shutil.rmtree(self.cache_dir, ignore_errors=True)
        models = (PRIMARY, CONTENDER)
        nodes = self.cluster.node_list[:pp]
        names = [f"pp{pp}-rank{rank}" for rank in range(pp)]
        log.info("scenario.start", scenario=f"contended pp{pp}", repeat=repeat)
        t0 = time.time()
        for served in models:
            for rank, node in enumerate(nodes):
                self.preload(node, pp, rank, served)
        procs: dict[Served, list[subprocess.Popen[bytes]]] = {}
        for served in models:
            timeline = self.work / f"timeline-contended-{served.name}.jsonl"
            timeline.unlink(missing_ok=True)
            procs[served] = self.start_workers(pp, timeline, eager=True, served=served)
        ttfts: dict[str, float] = {}
        errors: dict[str, str] = {}

        def serve(served: Served) -> None:
            try:
                self.wait_ready(procs[served], list(zip(nodes, names, strict=True)), served)
                ttfts[served.name] = self.first_token(t0, served)[0]
            except Exception as exc:  # reported below, with the other model's outcome
                errors[served.name] = repr(exc)

        threads = [threading.Thread(target=serve, args=(served,)) for served in models]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for served_procs in procs.values():
                self.stop(served_procs)
        if errors:
            raise RuntimeError(f"contended cold start failed: {errors}")
        fetches: dict[str, list[list[float]]] = {}
        for served in models:
            spans = []
            for node, name in zip(nodes, names, strict=True):
                status = self.fetch_status(node, name, served) or {}
                spans.append([status["started_at"] - t0, status["finished_at"] - t0])
            fetches[served.name] = [[round(a, 3), round(b, 3)] for a, b in spans]
        return {"ttft_s": {k: round(v, 3) for k, v in ttfts.items()}, "fetch": fetches}

    def serverless_vllm(self, scenario: Scenario) -> Outcome:
        """Stock vLLM; ``local-vllm``: the checkpoint is on the node's disk before the
        request (ServerlessLLM-style local cache), else it is downloaded first."""
        node = self.cluster.node_list[0]
        ckpt = self.work / "nodes" / "node-0" / "checkpoint"
        env = self.node_env(node, 1)
        if scenario.kind == "local-vllm":
            self.local_store.download_side_files(ckpt)
            self.local_store.download_checkpoint(ckpt / WEIGHTS_NAME)
            subprocess.run(["sync"], check=False)
        t0 = time.time()
        if scenario.kind == "serverless-vllm":
            download = self.cluster.spawn(
                node.ns,
                [sys.executable, "-m", "benchmarks.cold_start.download", MODEL_URI, str(ckpt)],
                env=env,
                log_name="baseline-download",
            )
            if download.wait(self.args.timeout) != 0:
                raise RuntimeError("baseline download failed; see logs")
        fetched = time.time()
        server = self.cluster.spawn(
            node.ns,
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(ckpt),
                "--served-model-name",
                "bench",
                "--host",
                node.ip,
                "--port",
                str(WORKER_PORT),
                "--enforce-eager",
                "--max-model-len",
                "512",
                "--max-num-batched-tokens",
                "256",
                "--kv-cache-memory-bytes",
                str(128 << 20),
                "--disable-log-stats",
            ],
            env=env,
            log_name="baseline-vllm",
        )
        try:
            ready = self.wait_ready([server], [])
            ttft, text = self.first_token(t0)
        finally:
            self.stop([server])
        stages = {
            "fetch[0]": [0.0, fetched - t0],
            "engine_start[0]": [fetched - t0, ready - t0],
            "first_token": [ready - t0, ttft],
        }
        return Outcome(scenario.name, 1, ttft, ready - t0, stages, text)


def ensure_model(size: str, work: Path) -> Path:
    path = work / f"demo-{size}"
    if not (path / "config.json").exists():
        make_demo_model(path, size)
    return path


def plot(results: dict[str, Outcome], path: Path, title: str) -> None:
    """A timeline per system: for each stage's node, the network (fetch) on top and the
    worker process (imports, engine start, waiting for verified bytes) below it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    network = {"fetch": "#4c72b0"}
    worker = {
        "imports": "#dd8452",
        "engine_start": "#dd8452",
        "engine_init": "#c44e52",
        "weights_verified": "#8172b3",
    }
    labels = {
        "fetch": "fetch (network)",
        "imports": "imports / engine start",
        "engine_init": "engine init (stage 0)",
        "weights_verified": "engine ready, waiting for verified bytes",
        "first_token": "first token",
    }
    names = list(results)
    fig, ax = plt.subplots(figsize=(11, 1.0 * len(names) + 1.5))
    for row, name in enumerate(names):
        outcome = results[name]
        band = 0.84 / max(outcome.pp, 1)
        for key, (start, end) in outcome.stages.items():
            stage, _, rest = key.partition("[")
            rank = int(rest.rstrip("]")) if rest else 0
            top = row - 0.42 + rank * band
            if stage in network:
                ax.barh(
                    top,
                    end - start,
                    left=start,
                    height=band * 0.45,
                    color=network[stage],
                    align="edge",
                )
            elif stage in worker:
                ax.barh(
                    top + band * 0.47,
                    max(end - start, 0.2),
                    left=start,
                    height=band * 0.45,
                    color=worker[stage],
                    align="edge",
                )
        ax.plot([outcome.ttft_s, outcome.ttft_s], [row - 0.45, row + 0.45], color="black", lw=2)
        ax.text(outcome.ttft_s + 3, row, f"{outcome.ttft_s:.1f} s", va="center")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the request (cold start)")
    ax.set_title(title)
    shown = {
        **network,
        "imports": worker["imports"],
        "engine_init": worker["engine_init"],
        "weights_verified": worker["weights_verified"],
    }
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in shown.values()]
    handles.append(plt.Line2D([0], [0], color="black", lw=2))
    ax.legend(
        handles, [labels[k] for k in shown] + [labels["first_token"]], loc="lower right", fontsize=8
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def replot() -> None:
    """Redraw the chart from benchmarks/results/cold_start.json."""
    data = json.loads((RESULTS_DIR / "cold_start.json").read_text())
    results = {
        name: Outcome(name, s["pp"], s["ttft_s"], s["ready_s"], s["stages"])
        for name, s in data["systems"].items()
    }
    plot(
        results,
        RESULTS_DIR / "cold_start.png",
        f"Cold start, {data['model_bytes'] / 1e9:.2f} GB model, "
        f"{data['link_rate_mbit']:g} Mbit/s per node",
    )


# Measured once per run: the bytes are already on the nodes, so the link rate plays no part.
ONCE = [
    Scenario("first start pp1 (no artifact)", "first", 1),
    Scenario("first start pp2 (no artifact)", "first", 2),
    Scenario("first start pp4 (no artifact)", "first", 4),
    Scenario("floor pp1", "floor", 1),
    Scenario("floor pp2", "floor", 2),
    Scenario("floor pp4", "floor", 4),
    Scenario("(b) ServerlessLLM-style (local cache, stock vLLM)", "local-vllm", 1),
]
PER_RATE = [
    Scenario("(a) serverless vLLM", "serverless-vllm", 1),
    Scenario("(c) HydraServe pp1", "hydraserve", 1),
    Scenario("(d) HydraServe pp2", "hydraserve", 2),
    Scenario("(d) HydraServe pp4", "hydraserve", 4),
]


def median_outcome(runs: list[Outcome]) -> Outcome:
    """The run with the median TTFT (never the best); its spread travels in the report."""
    ordered = sorted(runs, key=lambda o: o.ttft_s)
    return ordered[(len(ordered) - 1) // 2]


def spread(runs: list[Outcome]) -> dict[str, Any]:
    ttfts = [o.ttft_s for o in runs]
    return {
        "runs": len(ttfts),
        "ttft_median_s": round(statistics.median(ttfts), 3),
        "ttft_min_s": round(min(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
        "ttft_all_s": [round(t, 3) for t in ttfts],
    }


def run_scenarios(
    bench: Bench, scenarios: list[Scenario], repeats: int
) -> tuple[dict[str, Outcome], dict[str, dict[str, Any]]]:
    medians: dict[str, Outcome] = {}
    spreads: dict[str, dict[str, Any]] = {}
    for scenario in scenarios:
        # A first start is first only once: it is not repeated.
        runs = [bench.run(scenario, r) for r in range(1 if scenario.kind == "first" else repeats)]
        medians[scenario.name] = median_outcome(runs)
        spreads[scenario.name] = spread(runs)
        log.info("scenario.done", scenario=scenario.name, **spreads[scenario.name])
    return medians, spreads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1g", help="demo model size (see model make-demo)")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[100.0], help="link rates per node, Mbit/s"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs per scenario and rate")
    parser.add_argument(
        "--once-repeats",
        type=int,
        help="runs of each rate-independent scenario (floors, local cache); default --repeats",
    )
    parser.add_argument(
        "--inductor", action="store_true", help="pipeline stages compile with Inductor"
    )
    parser.add_argument("--work-dir", default="/tmp/hydraserve-bench-cold-start")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--only", nargs="*", help="run only these scenarios")
    parser.add_argument("--replot", action="store_true", help="only redraw the chart")
    parser.add_argument(
        "--contended",
        type=int,
        metavar="RUNS",
        help="only run the contended case (two models cold-starting at once as pp 2 "
        "pipelines on the same two nodes) RUNS times at the first rate, and add it to the "
        "existing results",
    )
    args = parser.parse_args()
    if args.replot:
        replot()
        return
    configure_logging("INFO")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = ensure_model(args.size, work)
    args.checkpoint = str(checkpoint)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")

    def chosen(scenarios: list[Scenario]) -> list[Scenario]:
        if not args.only:
            return scenarios
        return [s for s in scenarios if any(o in s.name for o in args.only)]

    once: dict[str, Outcome] = {}
    once_spread: dict[str, dict[str, Any]] = {}
    per_rate: dict[float, tuple[dict[str, Outcome], dict[str, dict[str, Any]]]] = {}
    manifest: Manifest | None = None
    # The emulated store (moto) copies the whole object for every ranged GET: the model is
    # stored as 64 MB parts (the default) and every system reads whole parts.
    prefetcher_env = {"HYDRASERVE_PREFETCHER_CHUNK_BYTES": str(RANGE_BYTES)}
    if args.contended:
        run_contended(args, checkpoint, prefetcher_env)
        return
    for index, rate in enumerate(args.rates):
        with EmulatedCluster(
            nodes=4, rate_mbit=rate, log_dir=work / "logs", prefetcher_env=prefetcher_env
        ) as cluster:
            store = ModelStore(ModelRef(MODEL_URI), S3Settings(endpoint_url=cluster.s3_endpoint))
            store.push(checkpoint)
            manifest = store.manifest()
            bench = Bench(cluster, manifest, args)
            bench.start_warm_runtimes()
            if index == 0:
                once_repeats = args.once_repeats or args.repeats
                once, once_spread = run_scenarios(bench, chosen(ONCE), once_repeats)
            else:  # a new store: what HydraServe shipped with the model goes with it
                for scenario in chosen([s for s in ONCE if s.kind == "first"]):
                    bench.run(scenario, 0)
            per_rate[rate] = run_scenarios(bench, chosen(PER_RATE), args.repeats)
    assert manifest is not None
    report(once, once_spread, per_rate, manifest, args)


def contended_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The contended runs, and per run the slower model's TTFT (the links are not shared
    fairly: one model's stages may get more of them), median and min-max."""
    slowest = [max(run["ttft_s"].values()) for run in runs]
    return {
        "runs": runs,
        "slowest_ttft_median_s": round(statistics.median(slowest), 3),
        "slowest_ttft_min_s": round(min(slowest), 3),
        "slowest_ttft_max_s": round(max(slowest), 3),
        "all_ttft_s": sorted(t for run in runs for t in run["ttft_s"].values()),
    }


def run_contended(args: argparse.Namespace, checkpoint: Path, env: dict[str, str]) -> None:
    """The contended case at the first rate, added to the existing results."""
    path = RESULTS_DIR / "cold_start.json"
    data = json.loads(path.read_text())
    rate, pp = args.rates[0], 2
    work = Path(args.work_dir)
    with EmulatedCluster(
        nodes=pp, rate_mbit=rate, log_dir=work / "logs", prefetcher_env=env
    ) as cluster:
        s3 = S3Settings(endpoint_url=cluster.s3_endpoint)
        for served in (PRIMARY, CONTENDER):
            ModelStore(ModelRef(served.uri), s3).push(checkpoint)
        bench = Bench(cluster, ModelStore(ModelRef(PRIMARY.uri), s3).manifest(), args)
        bench.start_warm_runtimes()
        for served in (PRIMARY, CONTENDER):  # each ships its artifacts, as in the sweep
            bench.reset()
            bench.first_start(pp, served)
        runs = [bench.contended(pp, repeat) for repeat in range(args.contended)]
    data["contended"] = {
        "rate_mbit": rate,
        "pp": pp,
        "models": 2,
        "machine": machine_info(),
        **contended_summary(runs),
    }
    calibrated = data.get("sim_fidelity", {}).get("calibrated_at_mbit")
    data["sim_fidelity"] = fidelity(data, calibrate_at=calibrated)
    write_result("cold_start", data)
    print(json.dumps({"contended": data["contended"], "sim_fidelity": data["sim_fidelity"]}))


def report(
    once: dict[str, Outcome],
    once_spread: dict[str, dict[str, Any]],
    per_rate: dict[float, tuple[dict[str, Outcome], dict[str, dict[str, Any]]]],
    manifest: Manifest,
    args: argparse.Namespace,
) -> None:
    from rich.console import Console
    from rich.table import Table

    total = manifest.total_bytes
    floors = {pp: once[f"floor pp{pp}"].ttft_s for pp in (1, 2, 4) if f"floor pp{pp}" in once}
    firsts = {
        pp: once[f"first start pp{pp} (no artifact)"].ttft_s
        for pp in (1, 2, 4)
        if f"first start pp{pp} (no artifact)" in once
    }

    def bound(pp: int, rate_mbit: float) -> float | None:
        if pp not in floors:
            return None
        return float(max(total / (pp * rate_mbit * 1e6 / 8), floors[pp]))

    console = Console(width=150)
    table = Table(title=f"Once per run: bytes already local, {total / 1e9:.2f} GB model")
    for column in ("scenario", "TTFT median (s)", "min-max (s)", "runs"):
        table.add_column(column, justify="left" if column == "scenario" else "right")
    for name, sp in once_spread.items():
        table.add_row(
            name, f"{sp['ttft_median_s']:.1f}", f"{sp['ttft_min_s']:.1f}-{sp['ttft_max_s']:.1f}",
            str(sp["runs"]),
        )  # fmt: skip
    console.print(table)

    data: dict[str, Any] = {
        "benchmark": "cold_start",
        "model_bytes": total,
        "model_size": args.size,
        "machine": machine_info(),
        "cache_state": "every scenario starts with an empty vLLM cache on every node; "
        "HydraServe's compile artifacts (stored with the model) are carried",
        "pipeline_stage_compile": "inductor" if args.inductor else "eager",
        "once": {name: {**o.as_dict(), **once_spread[name]} for name, o in once.items()},
        "stage_bytes": {
            str(pp): [stage.nbytes for stage in manifest.partitions[pp]]
            for pp in (1, 2, 4)
            if pp in manifest.partitions
        },
        "sweep": [],
    }
    for pp, value in floors.items():
        data[f"floor_pp{pp}_s"] = round(value, 3)
    for pp, value in firsts.items():
        data[f"first_start_floor_pp{pp}_s"] = round(value, 3)
    stock = None
    broken: list[str] = []
    for rate, (medians, spreads) in per_rate.items():
        table = Table(title=f"Cold TTFT, {total / 1e9:.2f} GB model, {rate:g} Mbit/s per node")
        for column in ("system", "TTFT median (s)", "min-max (s)", "ready (s)", "bound (s)"):
            table.add_column(column, justify="left" if column == "system" else "right")
        entry: dict[str, Any] = {"rate_mbit": rate, "systems": {}}
        baseline = medians.get("(a) serverless vLLM")
        if baseline is not None and "engine_start[0]" in baseline.stages:
            start, end = baseline.stages["engine_start[0]"]
            engine_start = end - start
            stock = engine_start if stock is None else stock
            fetch_one_link = total / (rate * 1e6 / 8)
            entry["f_over_e"] = round(fetch_one_link / engine_start, 3)
            entry["stock_vllm_engine_start_s"] = round(engine_start, 3)
        for name, outcome in medians.items():
            sp = spreads[name]
            b = bound(outcome.pp, rate) if "HydraServe" in name else None
            entry["systems"][name] = {**outcome.as_dict(), **sp}
            if b is not None:
                ratio = sp["ttft_median_s"] / b
                entry[f"ttft_over_bound_pp{outcome.pp}"] = round(ratio, 3)
                entry[f"bound_pp{outcome.pp}_s"] = round(b, 3)
                if sp["ttft_min_s"] < b:
                    broken.append(
                        f"{name} at {rate:g} Mbit/s: {sp['ttft_min_s']:.2f} s < {b:.2f} s"
                    )
            table.add_row(
                name,
                f"{sp['ttft_median_s']:.1f}",
                f"{sp['ttft_min_s']:.1f}-{sp['ttft_max_s']:.1f}",
                f"{outcome.ready_s:.1f}",
                "-" if b is None else f"{b:.1f}",
            )
        if baseline is not None:
            for pp in (1, 2, 4):
                ours = medians.get(f"({'c' if pp == 1 else 'd'}) HydraServe pp{pp}")
                if ours is not None:
                    entry[f"speedup_pp{pp}"] = round(
                        spreads["(a) serverless vLLM"]["ttft_median_s"]
                        / spreads[ours.name]["ttft_median_s"],
                        3,
                    )
        console.print(table)
        if "f_over_e" in entry:
            console.print(f"F/E at {rate:g} Mbit/s = {entry['f_over_e']}")
        data["sweep"].append(entry)
    if stock is not None:
        data["stock_vllm_engine_start_s"] = round(stock, 3)
        if 1 in floors:
            data["stock_engine_start_over_floor_pp1"] = round(stock / floors[1], 3)
    for pp in (2, 4):
        if pp in floors and 1 in floors:
            data[f"floor_pp{pp}_over_floor_pp1"] = round(floors[pp] / floors[1], 3)
    # The primary rate's systems at the top level (the timeline chart reads them).
    primary = next((e for e in data["sweep"] if e["rate_mbit"] == args.rates[0]), None)
    if primary is not None:
        data["link_rate_mbit"] = args.rates[0]
        data["systems"] = {**data["once"], **primary["systems"]}
    if len(data["sweep"]) > 1 and 1 in floors:
        data["sim_fidelity"] = fidelity(data, calibrate_at=args.rates[0])
    path = write_result("cold_start", data)
    first_rate = per_rate.get(args.rates[0])
    if first_rate is not None:
        plot(
            {**once, **first_rate[0]},
            RESULTS_DIR / "cold_start.png",
            f"Cold start, {total / 1e9:.2f} GB model, {args.rates[0]:g} Mbit/s per node",
        )
    if len(per_rate) > 1:
        plot_sweep(data, RESULTS_DIR / "cold_start_sweep.png")
    console.print(f"wrote {path}")
    summary = [k for k in data if k.startswith(("floor_pp", "stock_vllm", "stock_engine"))]
    for key in summary:
        console.print(f"{key} = {data[key]}")
    if broken:
        console.print("[bold red]TTFT below its physical bound (a benchmark bug):[/]")
        for line in broken:
            console.print(f"  {line}")
        raise SystemExit(1)


def plot_sweep(data: dict[str, Any], path: Path) -> None:
    """TTFT (median, with min-max) against link rate, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = sorted(data["sweep"], key=lambda e: e["rate_mbit"])
    rates = [e["rate_mbit"] for e in sweep]
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in sweep[0]["systems"]:
        xs, ys, lo, hi = [], [], [], []
        for entry in sweep:
            sp = entry["systems"].get(name)
            if sp:
                xs.append(entry["rate_mbit"])
                ys.append(sp["ttft_median_s"])
                lo.append(sp["ttft_median_s"] - sp["ttft_min_s"])
                hi.append(sp["ttft_max_s"] - sp["ttft_median_s"])
        ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=name)
    local = data["once"].get("(b) ServerlessLLM-style (local cache, stock vLLM)")
    if local:
        ax.axhline(
            local["ttft_median_s"], color="grey", ls="--", label="(b) local cache, stock vLLM"
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(rates, [f"{r:g}" for r in rates])
    ax.set_xlabel("link rate per node (Mbit/s)")
    ax.set_ylabel("cold TTFT (s), median and min-max")
    ax.set_title(f"Cold TTFT against link rate, {data['model_bytes'] / 1e9:.2f} GB model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
