"""Consolidation benchmark: what a pipeline costs, and what consolidating it gives back.

Three runs of the embedded platform (gateway + local backend + real vLLM workers, in this
process), each a cold start of the same model followed by the same load (``--clients``
streams back to back for ``--horizon`` seconds from the first request):

(a) **standalone**: pp = 1, eager, on the cores a consolidated standalone gets: the
    reference TPOT;
(b) **pipeline**: pp = 2 (compiled, one core per stage), consolidation off: the pipeline's
    TPOT and memory for the whole horizon;
(c) **consolidated**: pp = 2 with consolidation: the pipeline serves, a standalone engine
    starts from shared memory, takes over the in-flight streams (moved by the gateway) and
    the pipeline's stages are released.

Reported: TPOT of (b), of (c) before the switch, of (c) after it, of (a), and
``tpot_after_over_standalone``; the longest gap between tokens any stream moved in (c) saw
(client side), failed requests; the memory-time cost (GB·s of the instance processes'
proportional set size, sampled) over the same window for (b) and (c). Writes
``benchmarks/results/consolidation.json``.

``.venv/bin/python -m benchmarks.consolidation.run [--size small] [--horizon 150]``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import machine_info, write_result
from hydraserve.api.models import ServerlessModel
from hydraserve.backends.base import ModelView
from hydraserve.backends.local import LocalBackend, LocalSettings
from hydraserve.gateway import GatewaySettings, create_app
from hydraserve.logs import configure_logging, get_logger
from hydraserve.settings import CommonSettings
from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model
from tests.support.fakes import serve_asgi

log = get_logger("bench.consolidation")

REPO = Path(__file__).resolve().parents[2]
MODEL = "bench"
WARMUP_S = 10.0  # TPOT of a fresh engine's first seconds is not its steady state


@dataclass
class Stream:
    """One streamed request as the client saw it."""

    started: float
    tokens: list[float] = field(default_factory=list)  # arrival time of each token event
    ended: float = 0.0
    status: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        if len(self.tokens) < 8:
            return None
        return (self.tokens[-1] - self.tokens[0]) / (len(self.tokens) - 1)

    @property
    def max_gap(self) -> float:
        gaps = [b - a for a, b in itertools.pairwise(self.tokens)]
        return max(gaps, default=0.0)

    def gap_across(self, instant: float) -> float | None:
        """The gap between the last token before ``instant`` and the first after it."""
        for a, b in itertools.pairwise(self.tokens):
            if a <= instant < b:
                return b - a
        return None

    @property
    def max_gap_ended(self) -> float | None:
        """When the longest gap ended (its next token arrived)."""
        pairs = list(itertools.pairwise(self.tokens))
        return max(pairs, key=lambda p: p[1] - p[0])[1] if pairs else None


@dataclass
class RunResult:
    name: str
    started: float
    streams: list[Stream]
    memory: list[tuple[float, int]]  # (time, bytes of every instance process)
    view: ModelView | None
    metrics: dict[str, float]
    cold_ttft_s: float | None = None
    mean_load: float | None = None  # 1-minute load average (2 cores: above 2 is contention)

    @property
    def serving_since(self) -> float:
        """When the cold start's first token arrived (else when the run began)."""
        return self.started + (self.cold_ttft_s or 0.0)

    def mean_memory_gb(self, since: float, until: float) -> float | None:
        values = [b for t, b in self.memory if since <= t <= until]
        return round(statistics.mean(values) / 1e9, 3) if values else None

    def tpot_ms(self, since: float | None = None, until: float | None = None) -> float | None:
        values = [
            s.tpot
            for s in self.streams
            if s.tpot is not None
            and (since is None or s.started >= since)
            and (until is None or s.ended <= until)
        ]
        return round(statistics.median(values) * 1000, 3) if values else None

    def memory_gb_s(self, horizon: float) -> float:
        """∫ memory dt over [started, started + horizon], trapezoids, GB·s."""
        points = [(t, b) for t, b in self.memory if t <= self.started + horizon]
        total = 0.0
        for (t0, b0), (t1, b1) in itertools.pairwise(points):
            total += (t1 - t0) * (b0 + b1) / 2
        return round(total / 1e9, 1)


def instance_memory(backend: LocalBackend) -> int:
    """Proportional set size of every process of every instance (workers and what they
    started, also through the warm runtime): shared pages (the weights in /dev/shm,
    libraries, the runtime's imported modules) are split among their users."""
    import psutil

    total = 0
    for pids in backend.instance_pids(MODEL).values():
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_full_info().pss
            except psutil.Error:
                continue
    return total


async def stream_once(client: httpx.AsyncClient, serial: int, max_tokens: int) -> Stream:
    body = {
        "model": MODEL,
        "prompt": f"Request {serial}: once upon a time the cluster scaled from zero and",
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    stream = Stream(started=time.time())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            stream.status = response.status_code
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    stream.error = json.dumps(data)
                    continue
                if any(c.get("text") for c in data.get("choices") or []):
                    stream.tokens.append(time.time())
    except Exception as exc:
        stream.error = repr(exc)
    stream.ended = time.time()
    return stream


class Platform:
    """One embedded platform (gateway + local backend) in this process, its load and its
    instances' memory, sampled while it runs."""

    def __init__(self, name: str, model: ServerlessModel, local: LocalSettings) -> None:
        self.name = name
        self.backend = LocalBackend([model], local)
        self.app = create_app(self.backend, GatewaySettings(auth_enabled=False, access_log=False))
        self.url = ""
        self.started = 0.0
        self.streams: list[Stream] = []
        self.memory: list[tuple[float, int]] = []
        self.load_average: list[float] = []  # the machine's 1-minute load average while it ran
        self._stack = contextlib.AsyncExitStack()
        self._sampler: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Platform:
        self.url = await self._stack.enter_async_context(serve_asgi(self.app))
        self.started = time.time()
        self._sampler = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
        await self._stack.aclose()

    async def _sample(self) -> None:
        while True:
            used = await asyncio.to_thread(instance_memory, self.backend)
            self.memory.append((time.time(), used))
            self.load_average.append(os.getloadavg()[0])
            await asyncio.sleep(0.5)

    async def load(self, seconds: float, clients: int, max_tokens: int) -> list[Stream]:
        """``clients`` streams back to back for ``seconds``."""
        stop_at = time.time() + seconds
        streams: list[Stream] = []

        async def client(worker: int) -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=900) as http:
                serial = 0
                while time.time() < stop_at:
                    streams.append(await stream_once(http, worker * 10_000 + serial, max_tokens))
                    serial += 1

        await asyncio.gather(*(client(w) for w in range(clients)))
        self.streams += streams
        return streams

    def result(self) -> RunResult:
        view = self.backend.get_model(MODEL)
        registry = self.app.state.gateway.metrics.registry
        metrics = {
            f"{sample.name}{json.dumps(sample.labels, sort_keys=True)}": sample.value
            for metric in registry.collect()
            if metric.name.startswith(("hydraserve_gateway_migration", "hydraserve_consol"))
            for sample in metric.samples
        }
        # The first streams waited for the cold start: their first token is the cold TTFT.
        firsts = [s.tokens[0] for s in self.streams if s.tokens and s.started - self.started < 1]
        cold = min(firsts) - self.started if firsts else None
        load = round(statistics.mean(self.load_average), 2) if self.load_average else None
        return RunResult(self.name, self.started, list(self.streams), list(self.memory), view,
                         metrics, cold, load)  # fmt: skip


async def paired_load(
    first: Platform, second: Platform, seconds: float, clients: int, max_tokens: int
) -> tuple[list[Stream], list[Stream]]:
    """Streams to two platforms in alternation (each client: one to ``first``, one to
    ``second``, ...): their TPOTs are then measured under the same background load."""
    stop_at = time.time() + seconds
    a: list[Stream] = []
    b: list[Stream] = []

    async def client(worker: int) -> None:
        async with (
            httpx.AsyncClient(base_url=first.url, timeout=900) as one,
            httpx.AsyncClient(base_url=second.url, timeout=900) as two,
        ):
            serial = 0
            while time.time() < stop_at:
                # Both clients hit the same platform at a time (same batch sizes).
                target, into = (one, a) if serial % 2 == 0 else (two, b)
                into.append(await stream_once(target, 50_000 + worker * 1000 + serial, max_tokens))
                serial += 1

    await asyncio.gather(*(client(w) for w in range(clients)))
    return a, b


def prepare_model(state: Path, size: str) -> ServerlessModel:
    checkpoint = state / "checkpoints" / size
    if not (checkpoint / "config.json").exists():
        make_demo_model(checkpoint, size)
    store_dir = state / "store" / MODEL
    store = ModelStore(ModelRef(str(store_dir)))
    try:
        store.manifest()
    except Exception:
        store.push(checkpoint, name=MODEL)
    return ServerlessModel.model_validate(
        {
            "metadata": {"name": MODEL},
            "spec": {
                "source": {"uri": f"file://{store_dir}"},
                "resources": {"gpuMemoryGiB": 2},
                "scaling": {"minReplicas": 0, "keepAliveSeconds": 3600},
            },
        }
    )


def local_settings(state: Path, name: str, *, pp: int, consolidation: bool) -> LocalSettings:
    common = CommonSettings(state_dir=state / name, shm_dir=Path(f"/dev/shm/hs-bench-{name}"))
    shutil.rmtree(common.shm_dir, ignore_errors=True)
    return LocalSettings(
        common=common,
        vllm_cache_root=REPO / ".cache" / "vllm",
        pipeline_size=pp,
        enforce_eager=pp == 1,  # pp > 1 must be compiled on CPU (decision 0004)
        cpu_binds=["0", "1"] if pp > 1 else ["0,1"],
        consolidation=consolidation,
    )


def summarize(
    standalone: RunResult, pipeline: RunResult, consolidated: RunResult, horizon: float
) -> dict[str, Any]:
    record = None
    if consolidated.view is not None and consolidated.view.consolidations:
        record = consolidated.view.consolidations[-1]
    promoted = record.promoted_at if record else None
    released = record.released_at if record else None
    moved = [
        s
        for s in consolidated.streams
        if promoted is not None and s.started < promoted < s.ended and s.tokens
    ]
    failed = sum(
        1
        for run in (standalone, pipeline, consolidated)
        for s in run.streams
        if s.status != 200 or s.error
    )
    # Steady state: the first seconds of a fresh engine run first-call paths (kernels).
    tpot_standalone = standalone.tpot_ms(since=standalone.serving_since + WARMUP_S)
    tpot_pipeline = pipeline.tpot_ms(since=pipeline.serving_since + WARMUP_S)
    tpot_after = consolidated.tpot_ms(since=released) if released else None
    with_gbs = consolidated.memory_gb_s(horizon)
    without_gbs = pipeline.memory_gb_s(horizon)

    def count(prefix: str, **labels: str) -> float:
        key = prefix + json.dumps(labels, sort_keys=True)
        return consolidated.metrics.get(key, 0.0)

    return {
        "tpot_standalone_ms": tpot_standalone,
        "tpot_pipeline_ms": tpot_pipeline,
        "tpot_before_ms": (
            consolidated.tpot_ms(since=consolidated.serving_since + WARMUP_S, until=promoted)
            if promoted
            else None
        ),
        "tpot_after_ms": tpot_after,
        # Unpaired: (a) and (c) ran minutes apart; see "paired" for the side-by-side figure.
        "tpot_after_over_standalone_unpaired": (
            round(tpot_after / tpot_standalone, 3) if tpot_after and tpot_standalone else None
        ),
        "tpot_pipeline_over_standalone": (
            round(tpot_pipeline / tpot_standalone, 3) if tpot_pipeline and tpot_standalone else None
        ),
        "max_intertoken_gap_ms": round(max((s.max_gap for s in moved), default=0.0) * 1000, 1),
        # The gap the move itself caused: last token before the promotion to the first after.
        "switch_gap_ms": round(
            max((s.gap_across(promoted) or 0.0 for s in moved), default=0.0) * 1000, 1
        )
        if promoted
        else None,
        "moved_streams": len(moved),
        "migrations": {
            method: count(
                "hydraserve_gateway_migrations_total", method=method, model=f"default/{MODEL}"
            )
            for method in ("recompute", "kv")
        },
        "failed_requests": failed,
        "requests": sum(len(r.streams) for r in (standalone, pipeline, consolidated)),
        "cold_ttft_s": {
            "standalone": _round(standalone.cold_ttft_s),
            "pipeline": _round(pipeline.cold_ttft_s),
            "consolidated": _round(consolidated.cold_ttft_s),
        },
        "consolidation_s": {
            "total": _round(record.seconds if record else None),
            "fetch": _round(_gap(record.started_at, record.fetched_at) if record else None),
            "promote": _round(_gap(record.started_at, promoted) if record else None),
            "drain": _round(_gap(promoted, released)),
        },
        "memory_gb": {
            "standalone": standalone.mean_memory_gb(
                standalone.serving_since, standalone.started + horizon
            ),
            "pipeline": pipeline.mean_memory_gb(pipeline.serving_since, pipeline.started + horizon),
            "consolidating": consolidated.mean_memory_gb(
                consolidated.serving_since, promoted or 0.0
            ),
            "after_release": consolidated.mean_memory_gb(
                released or 0.0, consolidated.started + horizon
            ),
        },
        "memory_gb_s_with_consolidation": with_gbs,
        "memory_gb_s_without_consolidation": without_gbs,
        "memory_saving": round(1 - with_gbs / without_gbs, 3) if without_gbs else None,
        "horizon_s": horizon,
        "mean_load_average": {
            "standalone": standalone.mean_load,
            "pipeline": pipeline.mean_load,
            "consolidated": consolidated.mean_load,
        },
        "moved_stream_details": [
            {
                "started_s": round(s.started - consolidated.started, 2),
                "tokens": len(s.tokens),
                "max_gap_ms": round(s.max_gap * 1000, 1),
                "max_gap_ended_after_promotion_s": round((s.max_gap_ended or 0.0) - promoted, 3)
                if promoted
                else None,
                "tpot_ms": round((s.tpot or 0.0) * 1000, 2),
            }
            for s in moved
        ],
    }


def _gap(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None else end - start


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def print_table(result: dict[str, Any]) -> None:
    rows = [
        ("TPOT standalone pp1 (ms)", result["tpot_standalone_ms"]),
        ("TPOT pipeline pp2, no consolidation (ms)", result["tpot_pipeline_ms"]),
        ("TPOT pp2 before the switch (ms)", result["tpot_before_ms"]),
        ("TPOT after consolidation (ms)", result["tpot_after_ms"]),
        ("after / standalone (unpaired)", result["tpot_after_over_standalone_unpaired"]),
        ("paired: after, standalone (ms)", result.get("paired")),
        ("after / standalone (paired)", result["tpot_after_over_standalone"]),
        ("pipeline / standalone", result["tpot_pipeline_over_standalone"]),
        ("longest gap in a moved stream (ms)", result["max_intertoken_gap_ms"]),
        ("gap across the switch (ms)", result["switch_gap_ms"]),
        ("moved streams (client side)", result["moved_streams"]),
        ("moves by method", result["migrations"]),
        ("failed requests", f"{result['failed_requests']} of {result['requests']}"),
        ("consolidation (s)", result["consolidation_s"]),
        ("instance memory, mean (GB)", result["memory_gb"]),
        ("memory-time with consolidation (GB·s)", result["memory_gb_s_with_consolidation"]),
        ("memory-time without (GB·s)", result["memory_gb_s_without_consolidation"]),
        ("memory-time saved", result["memory_saving"]),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="hs-bench-consolidation-"))
    model = prepare_model(state, args.size)
    load = {"clients": args.clients, "max_tokens": args.max_tokens}
    settings = {
        name: local_settings(state, name, pp=pp, consolidation=consolidation)
        for name, pp, consolidation in (
            ("standalone", 1, False),
            ("pipeline", 2, False),
            ("consolidated", 2, True),
        )
    }
    # The reference standalone stays up (idle) to be measured again, paired with the
    # consolidated instance, under the same background load.
    async with Platform("standalone", model, settings["standalone"]) as standalone:
        log.info("scenario.start", scenario="standalone")
        await standalone.load(args.standalone_horizon, **load)
        log.info("scenario.start", scenario="pipeline")
        async with Platform("pipeline", model, settings["pipeline"]) as pipeline:
            await pipeline.load(args.horizon, **load)
            pipeline_result = pipeline.result()
        log.info("scenario.start", scenario="consolidated")
        async with Platform("consolidated", model, settings["consolidated"]) as consolidated:
            await consolidated.load(args.horizon, **load)
            consolidated_result = consolidated.result()
            log.info("scenario.start", scenario="paired")
            paired = await paired_load(consolidated, standalone, args.paired, **load)
        standalone_result = standalone.result()
    result = summarize(standalone_result, pipeline_result, consolidated_result, args.horizon)
    after = [s.tpot for s in paired[0] if s.tpot is not None]
    alone = [s.tpot for s in paired[1] if s.tpot is not None]
    paired_failed = sum(1 for s in paired[0] + paired[1] if s.status != 200 or s.error)
    result["failed_requests"] += paired_failed
    result["requests"] += len(paired[0]) + len(paired[1])
    result["tpot_after_over_standalone"] = result["tpot_after_over_standalone_unpaired"]
    if after and alone:
        result["paired"] = {
            "tpot_after_ms": round(statistics.median(after) * 1000, 3),
            "tpot_standalone_ms": round(statistics.median(alone) * 1000, 3),
            "streams": [len(after), len(alone)],
        }
        # The acceptance figure: measured side by side, so background load cancels.
        result["tpot_after_over_standalone"] = round(
            statistics.median(after) / statistics.median(alone), 3
        )
    result["config"] = {
        "size": args.size,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "horizon_s": args.horizon,
        "standalone_horizon_s": args.standalone_horizon,
        "paired_s": args.paired,
        "pipeline": "pp 2, compiled, VLLM_CPU_OMP_THREADS_BIND 0|1",
        "standalone": "pp 1, eager, in-process engine, VLLM_CPU_OMP_THREADS_BIND 0,1",
    }
    result["machine"] = machine_info()
    return result


async def run_stoppably(args: argparse.Namespace) -> dict[str, Any]:
    """main_async, cancelled on SIGTERM/SIGINT so every platform stops its workers."""
    task = asyncio.ensure_future(main_async(args))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    return await task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--size", default="small", help="demo model size (tiny, small, 100m)")
    parser.add_argument(
        "--horizon",
        type=float,
        default=200.0,
        help="seconds of load from the cold-start request (pipeline runs)",
    )
    parser.add_argument("--standalone-horizon", type=float, default=60.0)
    parser.add_argument(
        "--paired",
        type=float,
        default=60.0,
        help="seconds of alternating streams to the consolidated instance and "
        "the reference standalone",
    )
    parser.add_argument("--clients", type=int, default=2, help="concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--state-dir", default=None)
    args = parser.parse_args()  # fmt: skip
    configure_logging("INFO")
    result = asyncio.run(run_stoppably(args))
    print_table(result)
    path = write_result("consolidation", result)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
