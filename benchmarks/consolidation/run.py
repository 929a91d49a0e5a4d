"""Consolidation benchmark: what a pipeline costs, and what consolidating it gives back.

``--runs`` runs (default 5). Each run starts three embedded platforms (gateway + local
backend + real vLLM workers, in this process), each a cold start of the same model
followed by the same load (``--clients`` streams back to back for ``--horizon`` seconds
from the first request):

(a) **standalone from start**: pp = 1, eager, on both cores: what the platform would run
    had it started a standalone engine at the cold start and never a pipeline. The
    reference TPOT, and the cold TTFT and memory-time that (b) and (c) are compared with
    over the same window;
(b) **pipeline**: pp = 2, eager (HydraServe's CPU stage worker, decision 0105), one core
    per stage, consolidation off: the pipeline's TPOT and memory for the whole horizon;
(c) **consolidated**: pp = 2 with consolidation: the pipeline serves, a standalone engine
    starts from shared memory, takes over the in-flight streams (moved by the gateway) and
    the pipeline's stages are released.

Then ``--paired`` seconds of streams alternating between (c)'s standalone and (a) (kept up,
idle, since its load), so both TPOTs are measured under the same background load.

Per run: TPOT of (a), (b), (c) before and after the switch, ``tpot_after_over_standalone``
(paired) and unpaired; the longest gap between tokens any stream moved in (c) saw (client
side); failed requests; cold TTFTs; memory-time (GB·s of the instance processes'
proportional set size, sampled every 0.5 s) of each arm over [its start, start +
horizon]; the memory-time curve (the same for horizons every 10 s up to the horizon) and
``break_even_horizon_s``, the shortest horizon from which on (c) has cost no more
memory-time than (b) (extrapolated from the saving rate after the release when (c) is
still behind at the horizon). Over the runs: each key figure's median, a seeded percentile
bootstrap 95 % interval of that median, and every run's value.

Writes ``benchmarks/results/consolidation.json`` after every run (runs so far and their
summary), so a stopped session keeps the runs it finished. The defaults (5 runs, 150 s
horizon, 40 s paired) take about 9 min a run on the 2-core development machine, under
~50 min in all; a smoke:
``.venv/bin/python -m benchmarks.consolidation.run --runs 2 --horizon 40 --paired 10 --size tiny``
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import RESULTS_DIR, machine_info, write_result
from benchmarks.stats import bootstrap_median_interval
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
RELEASE_WAIT_S = 120.0  # how long after its load the consolidated arm may still consolidate
CURVE_STEP_S = 10.0

Samples = Sequence[tuple[float, int]]  # (time, bytes of every instance process)

# The figures summarized over runs (dotted: nested; ".*": every key of that mapping).
KEY_FIGURES: tuple[str, ...] = (
    "tpot_after_over_standalone",
    "tpot_after_over_standalone_unpaired",
    "tpot_pipeline_over_standalone",
    "tpot_standalone_ms",
    "tpot_pipeline_ms",
    "tpot_after_ms",
    "max_intertoken_gap_ms",
    "switch_gap_ms",
    "consolidation_s.total",
    "cold_ttft_s.*",
    "memory_saving",
    "memory_gb_s_with_consolidation",
    "memory_gb_s_without_consolidation",
    "memory_gb_s_standalone_from_start",
    "break_even_horizon_s",
    "failed_requests",
)
SUMMED = frozenset({"failed_requests"})  # a single failure matters, not its median


def memory_gb_s(samples: Samples, start: float, horizon: float) -> float:
    """∫ memory dt over [start, start + horizon] in GB·s: trapezoids between the samples,
    the last one cut at start + horizon by linear interpolation (on a 10 s grid, a whole
    0.5 s sample interval would otherwise be counted or dropped). Nothing is counted before
    the first sample: the sampler starts with the platform, before any instance exists."""
    end = start + horizon
    points = sorted((t, float(b)) for t, b in samples if t >= start)
    total = 0.0
    for (t0, b0), (t1, b1) in itertools.pairwise(points):
        if t0 >= end:
            break
        until = min(t1, end)
        at_until = b0 + (b1 - b0) * (until - t0) / (t1 - t0) if t1 > t0 else b1
        total += (until - t0) * (b0 + at_until) / 2
    return total / 1e9


def horizon_grid(horizon: float, step: float = CURVE_STEP_S) -> list[float]:
    """Every ``step`` seconds from ``step`` to ``horizon``, and the horizon itself when it
    is off the grid (the measured window's end is the figure the run reports)."""
    grid = [step * i for i in range(1, int(horizon / step + 1e-9) + 1)]
    if not grid or horizon - grid[-1] > 1e-9:
        grid.append(horizon)
    return grid


def memory_time_curve(
    arms: Mapping[str, tuple[float, Samples]], horizon: float, step: float = CURVE_STEP_S
) -> list[dict[str, float]]:
    """For each grid horizon h, each arm's GB·s over [its start, start + h]; ``arms`` maps
    a name to (start, samples)."""
    return [
        {"horizon_s": h}
        | {name: memory_gb_s(samples, start, h) for name, (start, samples) in arms.items()}
        for h in horizon_grid(horizon, step)
    ]


def saving_rate_gb(
    pipeline: tuple[float, Samples],
    consolidated: tuple[float, Samples],
    released_after: float | None,
    horizon: float,
) -> float | None:
    """GB the consolidated arm saves per second once its pipeline is gone: the pipeline
    arm's mean memory minus the consolidated arm's, both over [release, horizon] counted
    from each arm's own start. None without a release inside the horizon."""
    if released_after is None or released_after >= horizon:
        return None

    def mean(start: float, samples: Samples) -> float | None:
        window = [b for t, b in samples if start + released_after <= t <= start + horizon]
        return statistics.mean(window) if window else None

    without, with_ = mean(*pipeline), mean(*consolidated)
    if without is None or with_ is None:
        return None
    return (without - with_) / 1e9


def break_even_horizon(
    curve: Sequence[Mapping[str, float]], saving_rate: float | None
) -> tuple[float | None, bool]:
    """(h, extrapolated): the smallest grid horizon from which on the consolidated arm's
    GB·s are at most the pipeline's at every later grid point. If it is still behind at
    the last point: that point plus its deficit over ``saving_rate`` (GB saved per second
    after the release), extrapolated. (None, False) if it never catches up."""
    found: float | None = None
    for point in reversed(curve):
        if point["consolidated"] > point["pipeline"]:
            break
        found = point["horizon_s"]
    if found is not None:
        return found, False
    if not curve or saving_rate is None or saving_rate <= 0:
        return None, False
    last = curve[-1]
    return last["horizon_s"] + (last["consolidated"] - last["pipeline"]) / saving_rate, True


def figure_names(
    runs: Sequence[Mapping[str, Any]], figures: Sequence[str] = KEY_FIGURES
) -> list[str]:
    """``figures`` with each "prefix.*" replaced by prefix.key for every key any run has."""
    names: list[str] = []
    for figure in figures:
        if not figure.endswith(".*"):
            names.append(figure)
            continue
        prefix = figure[:-2]
        keys: dict[str, None] = {}
        for run in runs:
            nested = lookup(run, prefix)
            if isinstance(nested, Mapping):
                keys |= dict.fromkeys(nested)
        names += [f"{prefix}.{key}" for key in keys]
    return names


def lookup(record: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of nested mappings, or None."""
    value: Any = record
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def summarize_runs(
    runs: Sequence[Mapping[str, Any]], figures: Sequence[str] = KEY_FIGURES
) -> dict[str, dict[str, Any]]:
    """Per figure: the median over the runs that have it, a seeded bootstrap 95 % interval
    of that median, and every run's value (None skipped; a figure no run has is left out)."""
    summary: dict[str, dict[str, Any]] = {}
    for name in figure_names(runs, figures):
        values = [
            v
            for run in runs
            if isinstance(v := lookup(run, name), int | float) and not isinstance(v, bool)
        ]
        if not values:
            continue
        low, high = bootstrap_median_interval([float(v) for v in values])
        entry: dict[str, Any] = {
            "median": round(statistics.median(values), 4),
            "ci95": [round(low, 4), round(high, 4)],
            "all": values,
        }
        if name in SUMMED:
            entry["sum"] = sum(values)
        if name == "break_even_horizon_s":
            entry["extrapolated"] = [
                bool(run.get("break_even_extrapolated"))
                for run in runs
                if lookup(run, name) is not None
            ]
        summary[name] = entry
    return summary


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

    @property
    def samples(self) -> tuple[float, Samples]:
        return self.started, self.memory


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


async def finished_consolidation(platform: Platform, timeout: float) -> bool:
    """Whether the platform's consolidation has finished (done or abandoned), waiting up
    to ``timeout`` seconds: on a short horizon it may still run when the load ends."""
    deadline = time.time() + timeout
    while True:
        view = platform.backend.get_model(MODEL)
        if view is not None and view.consolidations:
            return view.consolidations[-1].released_at is not None
        if time.time() >= deadline:
            return False
        await asyncio.sleep(0.5)


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


def local_settings(
    state: Path, name: str, *, pp: int, consolidation: bool, run: int = 1
) -> LocalSettings:
    # Each run starts from empty state: no instance records or weights of an earlier run.
    shutil.rmtree(state / name, ignore_errors=True)
    common = CommonSettings(state_dir=state / name, shm_dir=Path(f"/dev/shm/hs-bench-{name}"))
    shutil.rmtree(common.shm_dir, ignore_errors=True)
    # Every arm runs eager, the platform's default (pipeline stages with HydraServe's CPU
    # stage worker, decision 0105), so enforce_eager is left as it is.
    return LocalSettings(
        common=common,
        vllm_cache_root=REPO / ".cache" / "vllm",
        pipeline_size=pp,
        cpu_binds=["0", "1"] if pp > 1 else ["0,1"],
        consolidation=consolidation,
        # The node names this backend's warm runtime (its socket is "<pid>-<node>"): with
        # one name, an arm's workers were forked by the runtime of the standalone still up
        # beside it (warm from its start, and outside this backend's memory accounting).
        # Per run too: the last run's runtime may not have let go of its socket yet.
        node_name=f"run{run}-{name}",
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
    curve = memory_time_curve(
        {
            "standalone_from_start": standalone.samples,
            "pipeline": pipeline.samples,
            "consolidated": consolidated.samples,
        },
        horizon,
    )
    at_horizon = {arm: round(gb_s, 1) for arm, gb_s in curve[-1].items()}  # the grid ends there
    with_gbs = at_horizon["consolidated"]
    without_gbs = at_horizon["pipeline"]
    rate = saving_rate_gb(
        pipeline.samples,
        consolidated.samples,
        None if released is None else released - consolidated.started,
        horizon,
    )
    break_even, extrapolated = break_even_horizon(curve, rate)

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
        # None, not 0, when no stream was in flight at the promotion (it came after the load).
        "max_intertoken_gap_ms": round(max(s.max_gap for s in moved) * 1000, 1) if moved else None,
        # The gap the move itself caused: last token before the promotion to the first after.
        "switch_gap_ms": round(max(s.gap_across(promoted) or 0.0 for s in moved) * 1000, 1)
        if promoted and moved
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
        "memory_gb_s_standalone_from_start": at_horizon["standalone_from_start"],
        "memory_saving": round(1 - with_gbs / without_gbs, 3) if without_gbs else None,
        "memory_saving_rate_gb": _round(rate),
        "break_even_horizon_s": _round(break_even),
        "break_even_extrapolated": extrapolated,
        "memory_time_curve": [{k: round(v, 1) for k, v in point.items()} for point in curve],
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


def print_summary(result: dict[str, Any]) -> None:
    """The summary over runs: per key figure, its median, the interval and every run."""
    from rich.console import Console
    from rich.table import Table

    config = result["config"]
    table = Table(
        title=f"Consolidation: {config['runs_completed']} of {config['runs']} runs, "
        f"{config['size']} model, {config['horizon_s']:g} s horizon "
        f"(median, bootstrap 95 % interval of the median, every run)"
    )
    for column in ("figure", "median", "95 % interval", "runs"):
        table.add_column(column, justify="left" if column in ("figure", "runs") else "right")
    for name, entry in result["summary"].items():
        runs = ", ".join(f"{v:g}" for v in entry["all"])
        if "sum" in entry:
            runs += f" (sum {entry['sum']:g})"
        if "extrapolated" in entry:
            runs += (
                " (extrapolated: "
                + ", ".join("yes" if e else "no" for e in entry["extrapolated"])
                + ")"
            )
        low, high = entry["ci95"]
        table.add_row(name, f"{entry['median']:g}", f"{low:g} - {high:g}", runs)
    for failure in result.get("failed_runs", []):
        table.add_row(f"run {failure['run']} failed", "", "", failure["error"][:120])
    Console(width=160).print(table)


async def one_run(
    args: argparse.Namespace, state: Path, model: ServerlessModel, index: int
) -> dict[str, Any]:
    """One run of the three arms and the paired phase: its summary."""
    began = time.monotonic()
    load = {"clients": args.clients, "max_tokens": args.max_tokens}
    state = state / f"run{index + 1}"
    settings = {
        name: local_settings(state, name, pp=pp, consolidation=consolidation, run=index + 1)
        for name, pp, consolidation in (
            ("standalone", 1, False),
            ("pipeline", 2, False),
            ("consolidated", 2, True),
        )
    }
    try:
        # The standalone stays up (idle) after its load to be measured again, paired with
        # the consolidated instance, under the same background load.
        async with Platform("standalone", model, settings["standalone"]) as standalone:
            log.info("scenario.start", run=index + 1, scenario="standalone")
            await standalone.load(args.horizon, **load)
            log.info("scenario.start", run=index + 1, scenario="pipeline")
            async with Platform("pipeline", model, settings["pipeline"]) as pipeline:
                await pipeline.load(args.horizon, **load)
                pipeline_result = pipeline.result()
            log.info("scenario.start", run=index + 1, scenario="consolidated")
            async with Platform("consolidated", model, settings["consolidated"]) as consolidated:
                await consolidated.load(args.horizon, **load)
                # The paired phase is about the standalone that took over, not the pipeline.
                released = await finished_consolidation(consolidated, RELEASE_WAIT_S)
                consolidated_result = consolidated.result()
                paired: tuple[list[Stream], list[Stream]] = ([], [])
                if released:
                    log.info("scenario.start", run=index + 1, scenario="paired")
                    paired = await paired_load(consolidated, standalone, args.paired, **load)
                else:
                    log.warning("paired.skipped", run=index + 1, reason="no consolidation",
                                waited_s=RELEASE_WAIT_S)  # fmt: skip
            standalone_result = standalone.result()
    finally:
        # Each arm's weights in /dev/shm: gigabytes on the full model, not needed again.
        for local in settings.values():
            shutil.rmtree(local.common.shm_dir, ignore_errors=True)
    result = summarize(standalone_result, pipeline_result, consolidated_result, args.horizon)
    after = [s.tpot for s in paired[0] if s.tpot is not None]
    alone = [s.tpot for s in paired[1] if s.tpot is not None]
    paired_failed = sum(1 for s in paired[0] + paired[1] if s.status != 200 or s.error)
    result["failed_requests"] += paired_failed
    result["requests"] += len(paired[0]) + len(paired[1])
    # Paired only: the unpaired figure has its own key, and a mix would blur the median.
    result["tpot_after_over_standalone"] = None
    result["paired"] = None
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
    result["wall_s"] = round(time.monotonic() - began, 1)
    return result


def assemble(
    args: argparse.Namespace,
    runs: Sequence[dict[str, Any]],
    failures: Sequence[dict[str, Any]],
    machine: dict[str, Any],
) -> dict[str, Any]:
    """The result file: the summary over the runs so far, the runs, and how they ran."""
    return {
        "summary": summarize_runs(runs),
        "runs": list(runs),
        "failed_runs": list(failures),
        "config": {
            "runs": args.runs,
            "runs_completed": len(runs),
            "size": args.size,
            "clients": args.clients,
            "max_tokens": args.max_tokens,
            "horizon_s": args.horizon,
            "paired_s": args.paired,
            "curve_step_s": CURVE_STEP_S,
            "bootstrap": "percentile, 10000 resamples, seed 0",
            "standalone": "pp 1, eager, in-process engine, VLLM_CPU_OMP_THREADS_BIND 0,1",
            "pipeline": "pp 2, eager (HydraServe's CPU stage worker), "
            "VLLM_CPU_OMP_THREADS_BIND 0|1",
        },
        "machine": machine,
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(args.state_dir or tempfile.mkdtemp(prefix="hs-bench-consolidation-"))
    model = prepare_model(state, args.size)
    machine = machine_info()
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for index in range(args.runs):
        log.info("run.start", run=index + 1, of=args.runs)
        began = time.monotonic()
        try:
            runs.append(await one_run(args, state, model, index))
        except Exception as exc:
            # One bad run (a worker that died, a timeout) must not cost the others.
            log.exception("run.failed", run=index + 1)
            failures.append({"run": index + 1, "error": repr(exc)})
        result = assemble(args, runs, failures, machine)
        # Written after every run: a stopped session keeps what it measured.
        path = write_result("consolidation", result)
        log.info("run.done", run=index + 1, wall_s=round(time.monotonic() - began, 1),
                 written=str(path))  # fmt: skip
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
    parser.add_argument("--runs", type=int, default=5, help="runs of the whole set")
    parser.add_argument(
        "--horizon",
        type=float,
        default=150.0,
        help="seconds of load from the cold-start request (every arm)",
    )
    parser.add_argument(
        "--paired",
        type=float,
        default=40.0,
        help="seconds of alternating streams to the consolidated instance and "
        "the reference standalone",
    )
    parser.add_argument("--clients", type=int, default=2, help="concurrent streams")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--state-dir", default=None)
    args = parser.parse_args()  # fmt: skip
    configure_logging("INFO")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    result = asyncio.run(run_stoppably(args))
    print_summary(result)
    print(f"wrote {RESULTS_DIR / 'consolidation.json'}")
    if not result["runs"]:
        raise SystemExit("no run completed")


if __name__ == "__main__":
    main()
