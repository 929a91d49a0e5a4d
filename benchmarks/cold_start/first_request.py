"""The first request after ``make up``: cold TTFT of the demo model on this machine.

Each run starts ``hydraserve up`` with a fresh state directory (a new demo model store, an
empty vLLM cache, nothing in shared memory), waits until the API answers and then until
the node's warm runtime has imported the engine (``--no-wait`` skips that: the request then
waits for it), sends one completion and reads the platform's cold-start record. It does so
with the warm runtime (decision 0600) and without it (``HYDRASERVE_LOCAL_WARM_RUNTIME=false``:
every worker a fresh interpreter, as before), alternating, ``--repeats`` times each, and
reports the median and min-max. Writes ``benchmarks/results/first_request.json``.

``.venv/bin/python -m benchmarks.cold_start.first_request --repeats 3``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import machine_info, write_result

PROMPT = "Once upon a time"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def one_run(work: Path, warm: bool, wait_for_runtime: bool) -> dict[str, Any]:
    state = work / ("warm" if warm else "cold")
    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    port = free_port()
    env = {
        **os.environ,
        "HYDRASERVE_LOCAL_WARM_RUNTIME": "true" if warm else "false",
        "HYDRASERVE_SHM_DIR": f"/dev/shm/hydraserve-first-request-{port}",
        "HYDRASERVE_LOG_JSON": "true",
    }
    log_path = state / "platform.log"
    with open(log_path, "wb") as log:
        up = subprocess.Popen(
            [
                *(sys.executable, "-m", "hydraserve.cli.main", "up"),
                *("--port", str(port), "--state-dir", str(state)),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}/v1"
    try:
        started = time.time()
        while True:
            try:
                if httpx.get(f"{base}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if up.poll() is not None or time.time() - started > 300:
                raise RuntimeError(f"hydraserve up did not answer; see {log_path}")
            time.sleep(0.1)
        api_s = time.time() - started
        runtime_log = state / "runtime" / "warm-local.log"
        if warm and wait_for_runtime:
            while "warm.ready" not in (runtime_log.read_text() if runtime_log.exists() else ""):
                if time.time() - started > 300:
                    raise RuntimeError("the warm runtime did not get ready")
                time.sleep(0.1)
        waited_s = time.time() - started
        body = {"model": "demo", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
        t0 = time.time()
        reply = httpx.post(f"{base}/completions", json=body, timeout=600)
        ttft = time.time() - t0
        reply.raise_for_status()
        text = reply.json()["choices"][0]["text"]
        record: dict[str, Any] = {}
        for line in log_path.read_text(errors="replace").splitlines():
            if '"instance.ready"' in line:
                record = json.loads(line)
                break
        return {
            "warm_runtime": warm,
            "ttft_s": round(ttft, 3),
            "api_up_s": round(api_s, 3),
            "sent_at_s": round(waited_s, 3),
            "cold_start_s": record.get("cold_start_s"),
            "stages": record.get("stages", {}),
            "text": text,
        }
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        shutil.rmtree(f"/dev/shm/hydraserve-first-request-{port}", ignore_errors=True)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ttfts = [r["ttft_s"] for r in runs]
    stages = sorted({k for r in runs for k in r["stages"]})
    return {
        "runs": len(runs),
        "ttft_median_s": round(statistics.median(ttfts), 3),
        "ttft_min_s": min(ttfts),
        "ttft_max_s": max(ttfts),
        "stage_median_s": {
            k: round(statistics.median(r["stages"].get(k, 0.0) for r in runs), 3) for k in stages
        },
    }


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-wait", action="store_true", help="send as soon as the API answers")
    parser.add_argument("--work-dir", default="/tmp/hydraserve-bench-first-request")
    args = parser.parse_args()
    work = Path(args.work_dir)
    runs: dict[bool, list[dict[str, Any]]] = {True: [], False: []}
    for _ in range(args.repeats):
        for warm in (True, False):  # alternating: drift on the machine hits both alike
            runs[warm].append(one_run(work, warm, not args.no_wait))
    texts = {r["text"] for rs in runs.values() for r in rs}
    if len(texts) != 1:
        raise SystemExit(f"the greedy completions differ between runs: {texts}")
    result: dict[str, Any] = {
        "benchmark": "first_request",
        "machine": machine_info(),
        "model": "demo (tiny)",
        "request": "sent once the warm runtime is ready"
        if not args.no_wait
        else "sent as soon as the API answers",
        "warm_runtime": summary(runs[True]),
        "fresh_interpreters": summary(runs[False]),
        "runs": runs[True] + runs[False],
    }
    result["speedup"] = round(
        result["fresh_interpreters"]["ttft_median_s"] / result["warm_runtime"]["ttft_median_s"], 3
    )
    table = Table(title="First request after `hydraserve up` (tiny demo, cold)")
    for column in ("workers", "TTFT median (s)", "min-max (s)", "imports (s)", "engine init (s)"):
        table.add_column(column, justify="left" if column == "workers" else "right")
    for name, key in (
        ("warm runtime", "warm_runtime"),
        ("fresh interpreters", "fresh_interpreters"),
    ):
        s = result[key]
        table.add_row(
            name,
            f"{s['ttft_median_s']:.1f}",
            f"{s['ttft_min_s']:.1f}-{s['ttft_max_s']:.1f}",
            f"{s['stage_median_s'].get('imports', 0):.1f}",
            f"{s['stage_median_s'].get('engine_init', 0):.1f}",
        )
    console = Console()
    console.print(table)
    path = write_result("first_request", result)
    console.print(f"speedup {result['speedup']}x; wrote {path}")


if __name__ == "__main__":
    main()
