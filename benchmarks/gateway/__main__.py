"""Gateway benchmark: ``python -m benchmarks.gateway [--quick]``.

Three processes: a fast fake engine, the gateway (in-memory cluster backend pointing at
that engine), and this load generator. In one run it measures

1. added latency: sequential requests to the engine directly vs. through the gateway
   (interleaved blocks, so drift in machine load hits both alike);
2. throughput: closed-loop clients at a fixed concurrency, directly vs. through the gateway;
3. bursts of 10x the queue capacity at a model scaling from zero (several times, to see
   memory stay bounded), at a model that never becomes ready (the deadline path) and at a
   warm model: every answer must be a completion, a 429 with Retry-After or the specified
   503 with Retry-After; nothing may be lost.

Results: a table on stdout and ``benchmarks/results/gateway.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from rich.console import Console
from rich.table import Table

from benchmarks.common import machine_info
from benchmarks.gateway.servers import COLD, STUCK, WARM, WARM_FAST

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "benchmarks" / "results" / "gateway.json"
TARGET_ADDED_P50_MS = 2.0
TARGET_THROUGHPUT_RATIO = 0.5

COMPLETION = {"prompt": "hello", "max_tokens": 8}
ANOMALIES: list[dict[str, Any]] = []  # answers that were neither a completion nor an error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gateway.servers", *args], env=env, cwd=REPO
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def wait_healthy(session: aiohttp.ClientSession, url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            async with session.get(url) as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def rss_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_rss_mb": round(fields["VmHWM"], 1)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- 1. added latency ---------------------------------------------------------------------


async def one_request(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with session.post(url, json=body) as response:
        await response.read()
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
    return time.perf_counter() - started


async def latency(
    session: aiohttp.ClientSession, direct: str, gateway: str, requests: int, stream: bool
) -> dict[str, Any]:
    body = {**COMPLETION, "model": WARM, "stream": stream}
    path = "/v1/completions"
    for _ in range(50):  # warm connections and code paths
        await one_request(session, direct + path, body)
        await one_request(session, gateway + path, body)
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    block = 100
    for _ in range(max(1, requests // block)):
        for name, base in (("direct", direct), ("gateway", gateway)):
            for _ in range(block):
                samples[name].append(await one_request(session, base + path, body))
    result: dict[str, Any] = {"requests_each": len(samples["direct"]), "stream": stream}
    for name, values in samples.items():
        result[f"{name}_p50_ms"] = round(statistics.median(values) * 1000, 3)
        result[f"{name}_p99_ms"] = round(percentile(values, 0.99) * 1000, 3)
    result["added_p50_ms"] = round(result["gateway_p50_ms"] - result["direct_p50_ms"], 3)
    result["added_p99_ms"] = round(result["gateway_p99_ms"] - result["direct_p99_ms"], 3)
    return result


# --- 2. throughput --------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(
    session: aiohttp.ClientSession, url: str, model: str, concurrency: int, seconds: float
) -> tuple[int, float]:
    body = {**COMPLETION, "model": model}
    done = 0
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done, errors
        while time.perf_counter() < stop_at:
            async with session.post(url, json=body) as response:
                await response.read()
                if response.status == 200:
                    done += 1
                else:
                    errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{errors} errors during the throughput run against {url}")
    return done, elapsed


async def throughput(
    session: aiohttp.ClientSession,
    direct: str,
    gateway: str,
    *,
    model: str,
    concurrency: int,
    seconds: float,
    rounds: int,
    gateway_pid: int,
) -> dict[str, Any]:
    path = "/v1/completions"
    direct_rps: list[float] = []
    gateway_rps: list[float] = []
    cpu_per_request: list[float] = []
    for _ in range(rounds):  # alternate, and keep each side's best round (least disturbed)
        done, elapsed = await closed_loop(session, direct + path, model, concurrency, seconds)
        direct_rps.append(done / elapsed)
        cpu_before = cpu_seconds(gateway_pid)
        done, elapsed = await closed_loop(session, gateway + path, model, concurrency, seconds)
        gateway_rps.append(done / elapsed)
        cpu_per_request.append((cpu_seconds(gateway_pid) - cpu_before) / done)
    best_direct, best_gateway = max(direct_rps), max(gateway_rps)
    return {
        "model": model,
        "concurrency": concurrency,
        "seconds_per_round": seconds,
        "direct_rps_rounds": [round(r, 1) for r in direct_rps],
        "gateway_rps_rounds": [round(r, 1) for r in gateway_rps],
        "direct_rps": round(best_direct, 1),
        "gateway_rps": round(best_gateway, 1),
        "throughput_ratio": round(best_gateway / best_direct, 3),
        "gateway_cpu_us_per_request": round(min(cpu_per_request) * 1e6, 1),
    }


# --- 3. bursts ------------------------------------------------------------------------------


@dataclass
class BurstOutcome:
    counts: Counter[str] = field(default_factory=Counter)

    @property
    def unexpected_5xx(self) -> int:
        return sum(n for k, n in self.counts.items() if k.startswith("unexpected"))


async def burst_request(session: aiohttp.ClientSession, url: str, model: str, stream: bool) -> str:
    """What became of one request: ok, queue_full, deadline, unexpected_*, or lost."""
    body = {**COMPLETION, "model": model, "stream": stream}
    try:
        async with session.post(url + "/v1/completions", json=body) as response:
            raw = await response.read()
            status = response.status
            retry_after = response.headers.get("Retry-After")
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"lost:{type(exc).__name__}"
    if status == 200 and not stream:
        try:
            return "ok" if json.loads(raw).get("choices") else "lost:no_choices"
        except ValueError:
            ANOMALIES.append({"status": status, "stream": stream, "body": raw[:300].decode()})
            return "lost:invalid_json"
    if status == 200:
        if not raw.endswith(b"data: [DONE]\n\n"):
            return "lost:truncated_stream"
        for event in raw.split(b"\n\n"):
            if event.startswith(b'data: {"error"'):
                code = json.loads(event[6:])["error"]["code"]
                return "deadline" if code == "cold_start_timeout" else f"unexpected_event:{code}"
        return "ok"
    code = json.loads(raw).get("error", {}).get("code") if raw.startswith(b"{") else None
    if status == 429 and code == "queue_full" and retry_after:
        return "queue_full"
    if status == 503 and code == "cold_start_timeout" and retry_after:
        return "deadline"
    if status >= 500:
        return f"unexpected_{status}:{code}"
    return f"other_{status}:{code}"


async def wait_scaled_to_zero(session: aiohttp.ClientSession, gateway: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with session.get(f"{gateway}/v1/models/{COLD}") as response:
            status = (await response.json())["hydraserve"]
        if status["desired_replicas"] == 0 and status["ready_instances"] == 0:
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the cold model did not scale back to zero")


async def burst(
    session: aiohttp.ClientSession, gateway: str, model: str, size: int
) -> BurstOutcome:
    # Half streaming, half not; all sent at once.
    results = await asyncio.gather(
        *(burst_request(session, gateway, model, stream=i % 2 == 1) for i in range(size))
    )
    return BurstOutcome(Counter(results))


async def bursts(
    session: aiohttp.ClientSession, gateway: str, pid: int, queue: int, cold_bursts: int
) -> dict[str, Any]:
    size = 10 * queue
    runs: list[dict[str, Any]] = []
    memory = [rss_mb(pid)]
    for model, repeat in ((COLD, cold_bursts), (STUCK, 1), (WARM, 1)):
        for _ in range(repeat):
            if model == COLD:
                await wait_scaled_to_zero(session, gateway)
            started = time.perf_counter()
            outcome = await burst(session, gateway, model, size)
            memory.append(rss_mb(pid))
            runs.append(
                {
                    "model": model,
                    "requests": size,
                    "seconds": round(time.perf_counter() - started, 2),
                    "outcomes": dict(sorted(outcome.counts.items())),
                    "unexpected_5xx": outcome.unexpected_5xx,
                    "lost": sum(n for k, n in outcome.counts.items() if k.startswith("lost")),
                    "other": sum(n for k, n in outcome.counts.items() if k.startswith("other")),
                    "gateway_memory_after": memory[-1],
                }
            )
    return {
        "queue_capacity": queue,
        "requests_per_burst": size,
        "runs": runs,
        "gateway_memory_before": memory[0],
        "unexpected_5xx": sum(r["unexpected_5xx"] + r["other"] for r in runs),
        "lost_requests": sum(r["lost"] for r in runs),
    }


# --- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    engine_port, fast_engine_port, gateway_port = free_port(), free_port(), free_port()
    direct = f"http://127.0.0.1:{engine_port}"
    direct_fast = f"http://127.0.0.1:{fast_engine_port}"
    gateway = f"http://127.0.0.1:{gateway_port}"
    result: dict[str, Any] = {
        "machine": {
            **machine_info(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "quick": args.quick,
        "engines": {
            "instant": "fake engine, 8 tokens, no delay: the pure cost of the proxy",
            "fast": f"fake engine, 8 tokens, {args.token_ms} ms per token after the first",
        },
    }
    gateway_args = [
        "--port", str(gateway_port), "--engine-url", direct, "--fast-engine-url", direct_fast,
        "--cold-start", str(args.cold_start), "--queue-size", str(args.queue),
        "--queue-timeout", str(args.queue_timeout),
    ]  # fmt: skip
    with (
        server("engine", "--port", str(engine_port)),
        server("engine", "--port", str(fast_engine_port), "--token-delay",
               str(args.token_ms / 1000)),
        server("gateway", *gateway_args) as gateway_process,
    ):  # fmt: skip
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            for url in (direct + "/health", direct_fast + "/health", gateway + "/healthz"):
                await wait_healthy(session, url)
            result["latency"] = await latency(session, direct, gateway, args.requests, False)
            result["latency_stream"] = await latency(
                session, direct, gateway, args.requests // 2, True
            )
            for name, model, base in (("fast", WARM_FAST, direct_fast), ("instant", WARM, direct)):
                result[f"throughput_{name}_engine"] = await throughput(
                    session,
                    base,
                    gateway,
                    model=model,
                    concurrency=args.concurrency,
                    seconds=args.seconds,
                    rounds=args.rounds,
                    gateway_pid=gateway_process.pid,
                )
            result["burst"] = await bursts(
                session, gateway, gateway_process.pid, args.queue, args.cold_bursts
            )
    result["added_p50_ms"] = result["latency"]["added_p50_ms"]
    result["throughput_ratio"] = result["throughput_fast_engine"]["throughput_ratio"]
    instant = result["throughput_instant_engine"]
    result["throughput_ratio_instant_engine"] = instant["throughput_ratio"]
    result["gateway_cpu_us_per_request"] = instant["gateway_cpu_us_per_request"]
    result["burst_unexpected_5xx"] = result["burst"]["unexpected_5xx"]
    result["burst_lost_requests"] = result["burst"]["lost_requests"]
    result["targets"] = {
        "added_p50_ms": f"<= {TARGET_ADDED_P50_MS}",
        "throughput_ratio": f">= {TARGET_THROUGHPUT_RATIO}",
        "burst_unexpected_5xx": "== 0",
        "burst_lost_requests": "== 0",
    }
    result["burst"]["anomalies"] = ANOMALIES[:20]
    result["passed"] = (
        result["added_p50_ms"] <= TARGET_ADDED_P50_MS
        and result["throughput_ratio"] >= TARGET_THROUGHPUT_RATIO
        and result["burst_unexpected_5xx"] == 0
        and result["burst_lost_requests"] == 0
    )
    return result


def report(result: dict[str, Any], console: Console) -> None:
    lat, slat, bu = result["latency"], result["latency_stream"], result["burst"]
    table = Table(title="HydraServe gateway vs. direct engine (fast fake engine)")
    for column in ("measure", "direct", "gateway", "result", "target"):
        table.add_column(column)
    table.add_row(
        "p50 latency, JSON (ms)",
        f"{lat['direct_p50_ms']:.3f}",
        f"{lat['gateway_p50_ms']:.3f}",
        f"+{lat['added_p50_ms']:.3f} ms",
        f"<= +{TARGET_ADDED_P50_MS} ms",
    )
    table.add_row(
        "p99 latency, JSON (ms)",
        f"{lat['direct_p99_ms']:.3f}",
        f"{lat['gateway_p99_ms']:.3f}",
        f"+{lat['added_p99_ms']:.3f} ms",
        "",
    )
    table.add_row(
        "p50 latency, SSE 8 tokens (ms)",
        f"{slat['direct_p50_ms']:.3f}",
        f"{slat['gateway_p50_ms']:.3f}",
        f"+{slat['added_p50_ms']:.3f} ms",
        "",
    )
    for name in ("fast", "instant"):
        tp = result[f"throughput_{name}_engine"]
        table.add_row(
            f"throughput, {name} engine, {tp['concurrency']} clients (req/s)",
            f"{tp['direct_rps']:.0f}",
            f"{tp['gateway_rps']:.0f}",
            f"{tp['throughput_ratio']:.2f}x",
            f">= {TARGET_THROUGHPUT_RATIO}x" if name == "fast" else "(reported)",
        )
    cpu = result["gateway_cpu_us_per_request"]
    table.add_row("gateway CPU per request (us)", "", f"{cpu}", "", "")
    console.print(table)
    bursts_table = Table(
        title=f"Bursts of {bu['requests_per_burst']} requests "
        f"(10x a queue of {bu['queue_capacity']})"
    )
    for column in ("model", "outcomes", "unexpected 5xx", "lost", "gateway RSS after (MB)"):
        bursts_table.add_column(column)
    for r in bu["runs"]:
        outcomes = ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())
        bursts_table.add_row(
            r["model"],
            outcomes,
            str(r["unexpected_5xx"] + r["other"]),
            str(r["lost"]),
            f"{r['gateway_memory_after']['rss_mb']:.0f}",
        )
    console.print(bursts_table)
    console.print(
        f"gateway RSS before bursts: {bu['gateway_memory_before']['rss_mb']:.0f} MB; "
        f"machine: {result['machine']['cores']} cores {result['machine']['cpu']}, "
        f"load {result['machine']['load_average_at_start']}"
    )
    console.print(
        f"[bold]{'PASS' if result['passed'] else 'FAIL'}[/]: added_p50_ms="
        f"{result['added_p50_ms']} throughput_ratio={result['throughput_ratio']} "
        f"burst_unexpected_5xx={result['burst_unexpected_5xx']} "
        f"burst_lost_requests={result['burst_lost_requests']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    parser.add_argument("--requests", type=int, default=2000, help="sequential, each side")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--token-ms", type=float, default=2.0, help="the fast engine's TPOT")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--queue", type=int, default=64, help="gateway queue per model")
    parser.add_argument("--queue-timeout", type=float, default=5.0)
    parser.add_argument("--cold-start", type=float, default=1.0)
    parser.add_argument("--cold-bursts", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.requests, args.seconds, args.rounds, args.cold_bursts = 200, 1.0, 1, 1
        args.queue_timeout = 2.0
    result = asyncio.run(run(args))
    report(result, Console())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    Console().print(f"written to {args.output}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
