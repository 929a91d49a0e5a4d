"""Cold-start benchmark (the paper's Fig. 7) on an emulated cluster of this machine.

Nodes are network namespaces whose links to the store are shaped to ``--rate-mbit``; the
model store is an S3 server in its own namespace. One run measures, for the same model and
link rate, the cold time-to-first-token and its stage breakdown of:

(a) serverless vLLM: download the whole checkpoint to the node, then start stock vLLM;
(b) ServerlessLLM-style: the checkpoint is already in the node's host-memory cache;
(c) HydraServe pp 1: prefetch starts with placement, the worker overlaps start-up with it;
(d) HydraServe pp 2 and 4: each node fetches only its stage.

It also measures the engine-ready floor per pipeline size (all bytes already local), and
reports speedup of (d) over (a) and (d)'s TTFT over the physical bound
``max(bytes / (pp x link rate), floor)``. Writes ``benchmarks/results/cold_start.json`` and
a chart ``benchmarks/results/cold_start.png``.

Run as root: ``.venv/bin/python -m benchmarks.cold_start.run --size 1g --rate-mbit 25``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
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
from hydraserve.worker.config import StageAddress, WorkerConfig
from hydraserve.worker.timeline import read_timeline

log = get_logger("bench.cold_start")

MODEL_URI = "s3://models/bench"
WORKER_PORT = 8100
MASTER_PORT = 29500
PROMPT = "Once upon a time"
RANGE_BYTES = 64 << 20


@dataclass
class Scenario:
    name: str
    kind: str  # "serverless-vllm", "cached", "hydraserve", "floor"
    pp: int = 1


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
        self.cache_root = self.work / "vllm-cache"
        self.http = httpx.Client(timeout=30)
        self.local_store = ModelStore(ModelRef(str(self.work / "store-local" / "bench")))
        if not self.local_store.backend.exists("manifest.json"):
            self.local_store.push(Path(args.checkpoint))

    # -- node helpers ------------------------------------------------------------------

    def node_env(self, node: EmulatedNode, pp: int) -> dict[str, str]:
        env = {
            "HYDRASERVE_S3__ENDPOINT_URL": self.cluster.s3_endpoint,
            "HYDRASERVE_SHM_DIR": str(node.shm_dir),
            "VLLM_HOST_IP": node.ip,
            "GLOO_SOCKET_IFNAME": node.iface,
            "VLLM_CACHE_ROOT": str(self.cache_root),
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
            shutil.rmtree(ModelShm(node.shm_dir, MODEL_URI, "main").dir, ignore_errors=True)
        shutil.rmtree(self.work / "nodes", ignore_errors=True)
        subprocess.run(["sync"], check=False)

    def preload(self, node: EmulatedNode, pp: int | None, rank: int | None) -> None:
        body = {"uri": MODEL_URI, "revision": "main", "pp": pp, "rank": rank}
        self.http.post(f"{node.prefetcher_url}/v1/preload", json=body).raise_for_status()

    def seed_cache(self, node: EmulatedNode, name: str, pp: int | None, rank: int | None) -> None:
        """Put a stage's bytes into a node's shared memory as its cache would hold them,
        copied from a local copy of the store (a cache is filled in the past, not over the
        benchmark's shaped link)."""
        shm = ModelShm(node.shm_dir, MODEL_URI, "main")
        shm.dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(shm.manifest_path, self.manifest.model_dump(mode="json"))
        ranges = self.manifest.fetch_ranges(pp, rank)
        RangeFetcher(self.local_store, self.manifest, shm, name, ranges).run()

    def fetch_status(self, node: EmulatedNode, name: str) -> dict[str, Any] | None:
        status = self.http.get(f"{node.prefetcher_url}/v1/status").json()
        for model in status["models"]:
            if model["uri"] == MODEL_URI:
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

    def start_workers(self, pp: int, timeline: Path, eager: bool) -> list[subprocess.Popen[bytes]]:
        nodes = self.cluster.node_list
        procs = []
        for rank in range(pp):
            node = nodes[rank]
            config = WorkerConfig(
                model_name="bench",
                uri=MODEL_URI,
                instance=f"bench-pp{pp}",
                pp=pp,
                rank=rank,
                host=node.ip,
                port=WORKER_PORT,
                rendezvous=StageAddress(master_addr=nodes[0].ip, master_port=MASTER_PORT),
                prefetcher_url=node.prefetcher_url,
                shm_dir=node.shm_dir,
                timeline=timeline,
                enforce_eager=eager,
                max_model_len=512,
                kv_cache_bytes=128 << 20,
            )
            path = self.work / f"worker-pp{pp}-rank{rank}.json"
            path.write_text(config.model_dump_json())
            procs.append(
                self.cluster.spawn(
                    node.ns,
                    [sys.executable, "-m", "hydraserve.cli.main", "worker", "--config", str(path)],
                    env=self.node_env(node, pp),
                    log_name=f"worker-pp{pp}-rank{rank}",
                )
            )
        return procs

    def wait_ready(
        self, procs: list[subprocess.Popen[bytes]], fetches: list[tuple[EmulatedNode, str]]
    ) -> float:
        """Time when stage 0 answers /health and every stage's bytes are verified."""
        url = f"http://{self.cluster.node_list[0].ip}:{WORKER_PORT}/health"
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
                (s := self.fetch_status(n, name)) and s["state"] == "done" for n, name in fetches
            ):
                return time.time()
            time.sleep(0.05)
        raise TimeoutError("instance not ready")

    def first_token(self, t0: float) -> tuple[float, str]:
        url = f"http://{self.cluster.node_list[0].ip}:{WORKER_PORT}/v1/completions"
        body = {
            "model": "bench",
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

    def run(self, scenario: Scenario) -> Outcome:
        self.reset()
        log.info("scenario.start", scenario=scenario.name)
        if scenario.kind == "serverless-vllm":
            return self.serverless_vllm(scenario)
        return self.hydraserve(scenario)

    def hydraserve(self, scenario: Scenario) -> Outcome:
        pp = scenario.pp
        nodes = self.cluster.node_list[:pp]
        names = ["full" if pp == 1 else f"pp{pp}-rank{r}" for r in range(pp)]
        preload_first = scenario.kind in ("cached", "floor")
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
        procs = self.start_workers(pp, timeline, eager=pp == 1)
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

    def serverless_vllm(self, scenario: Scenario) -> Outcome:
        node = self.cluster.node_list[0]
        ckpt = self.work / "nodes" / "node-0" / "checkpoint"
        env = self.node_env(node, 1)
        t0 = time.time()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1g", help="demo model size (see model make-demo)")
    parser.add_argument("--rate-mbit", type=float, default=25.0, help="link rate per node")
    parser.add_argument("--work-dir", default="/tmp/hydraserve-bench-cold-start")
    parser.add_argument("--timeout", type=float, default=1200.0)
    parser.add_argument("--only", nargs="*", help="run only these scenarios")
    parser.add_argument("--replot", action="store_true", help="only redraw the chart")
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

    scenarios = [
        Scenario("floor pp1 / (b) ServerlessLLM-style", "cached", 1),
        Scenario("floor pp2", "floor", 2),
        Scenario("floor pp4", "floor", 4),
        Scenario("(a) serverless vLLM", "serverless-vllm", 1),
        Scenario("(c) HydraServe pp1", "hydraserve", 1),
        Scenario("(d) HydraServe pp2", "hydraserve", 2),
        Scenario("(d) HydraServe pp4", "hydraserve", 4),
    ]
    if args.only:
        scenarios = [s for s in scenarios if any(o in s.name for o in args.only)]
    results: dict[str, Outcome] = {}
    # The emulated store (moto) copies the whole object for every ranged GET: the model is
    # stored as 64 MB parts (the default) and every system reads whole parts.
    prefetcher_env = {"HYDRASERVE_PREFETCHER_CHUNK_BYTES": str(RANGE_BYTES)}
    with EmulatedCluster(
        nodes=4, rate_mbit=args.rate_mbit, log_dir=work / "logs", prefetcher_env=prefetcher_env
    ) as cluster:
        store = ModelStore(ModelRef(MODEL_URI), S3Settings(endpoint_url=cluster.s3_endpoint))
        store.push(checkpoint)
        manifest = store.manifest()
        bench = Bench(cluster, manifest, args)
        for scenario in scenarios:
            outcome = bench.run(scenario)
            results[scenario.name] = outcome
            log.info("scenario.done", scenario=scenario.name, ttft_s=round(outcome.ttft_s, 2))

    report(results, manifest, args)


def report(results: dict[str, Outcome], manifest: Manifest, args: argparse.Namespace) -> None:
    from rich.console import Console
    from rich.table import Table

    rate_bytes = args.rate_mbit * 1e6 / 8
    total = manifest.total_bytes

    def bound(pp: int) -> float | None:
        floor = next((o for o in results.values() if o.name.startswith(f"floor pp{pp}")), None)
        if floor is None:
            return None
        return float(max(total / (pp * rate_bytes), floor.ttft_s))

    table = Table(
        title=f"Cold TTFT, {total / 1e9:.2f} GB model, {args.rate_mbit:g} Mbit/s per node"
    )
    table.add_column("system")
    table.add_column("TTFT (s)", justify="right")
    table.add_column("ready (s)", justify="right")
    table.add_column("fetch done (s)", justify="right")
    table.add_column("bound (s)", justify="right")
    for name, outcome in results.items():
        fetch_end = max(
            (v[1] for k, v in outcome.stages.items() if k.startswith("fetch[")), default=None
        )
        b = bound(outcome.pp) if name.startswith("(") and "HydraServe" in name else None
        table.add_row(
            name,
            f"{outcome.ttft_s:.1f}",
            f"{outcome.ready_s:.1f}",
            "-" if fetch_end is None else f"{fetch_end:.1f}",
            "-" if b is None else f"{b:.1f}",
        )
    Console(width=140).print(table)

    data: dict[str, Any] = {
        "benchmark": "cold_start",
        "model_bytes": total,
        "model_size": args.size,
        "link_rate_mbit": args.rate_mbit,
        "machine": machine_info(),
        "systems": {name: o.as_dict() for name, o in results.items()},
    }
    baseline = next((o for o in results.values() if "serverless vLLM" in o.name), None)
    for pp in (2, 4):
        ours = next((o for o in results.values() if o.name == f"(d) HydraServe pp{pp}"), None)
        b = bound(pp)
        if ours and baseline:
            data[f"speedup_pp{pp}_vs_serverless_vllm"] = round(baseline.ttft_s / ours.ttft_s, 3)
        if ours and b:
            data[f"ttft_over_bound_pp{pp}"] = round(ours.ttft_s / b, 3)
            data[f"bound_pp{pp}_s"] = round(b, 3)
    data["sim_fidelity"] = fidelity(data)
    path = write_result("cold_start", data)
    plot(
        results,
        RESULTS_DIR / "cold_start.png",
        f"Cold start, {total / 1e9:.2f} GB model, {args.rate_mbit:g} Mbit/s per node",
    )
    Console().print(f"wrote {path} and cold_start.png")
    for key in ("speedup_pp4_vs_serverless_vllm", "ttft_over_bound_pp4"):
        if key in data:
            Console().print(f"{key} = {data[key]}")


if __name__ == "__main__":
    main()
