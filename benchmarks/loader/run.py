"""Loader benchmark: bytes in shared memory → weights usable by the engine.

Compares HydraServe's streaming loader (tensors are views of the node's shared-memory
file: no copy) with ``safetensors.torch.load_file`` reading the same bytes (a copy into
process memory). Each path runs in a fresh process so peak RSS is its own; both include
the first touch of every byte (page faults), as a first forward pass would. Optionally
also starts a real vLLM worker with the ``hydraserve`` load format on the same bytes and
reports its in-engine adoption time and anonymous-memory growth.

``.venv/bin/python -m benchmarks.loader.run --size 1g`` → ``benchmarks/results/loader.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result
from hydraserve.logs import configure_logging, get_logger
from hydraserve.prefetcher.fetcher import FetchOptions, RangeFetcher
from hydraserve.prefetcher.shm import ModelShm
from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model
from hydraserve.worker.timeline import read_timeline

log = get_logger("bench.loader")


def measure(mode: str, manifest: Path, weights: Path, repeats: int) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.loader.measure", mode, str(manifest), str(weights)],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best: dict[str, Any] = min(runs, key=lambda r: r["adopt_seconds"] + r["touch_seconds"])
    return best


def engine_adoption(store_uri: str, shm_dir: Path, work: Path) -> dict[str, Any]:
    """Start a real worker on prefetched bytes; read its weight_load event."""
    from hydraserve.worker.config import WorkerConfig

    timeline = work / "engine-timeline.jsonl"
    timeline.unlink(missing_ok=True)
    config = WorkerConfig(
        model_name="bench",
        uri=store_uri,
        instance="loader-bench",
        port=18123,
        shm_dir=shm_dir,
        timeline=timeline,
        max_model_len=256,
        kv_cache_bytes=64 << 20,
    )
    path = work / "engine-worker.json"
    path.write_text(config.model_dump_json())
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CACHE_ROOT": str(work / "cache")}
    with open(work / "engine-worker.log", "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hydraserve.cli.main", "worker", "--config", str(path)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            events = [e for e in read_timeline(timeline) if e["stage"] == "weight_load"]
            if events:
                event = events[0]
                return {
                    "engine_weight_load_seconds": round(event["end"] - event["start"], 4),
                    "engine_anon_growth_bytes": event.get("anon_growth_bytes"),
                    "engine_adopted_zero_copy": event.get("adopted_zero_copy"),
                    "engine_copied_bytes": event.get("copied_bytes"),
                }
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited; see {work / 'engine-worker.log'}")
            time.sleep(0.2)
        raise TimeoutError("worker did not load weights")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1g")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work-dir", default="/tmp/hydraserve-bench-loader")
    parser.add_argument("--no-engine", action="store_true", help="skip the real-engine run")
    args = parser.parse_args()
    configure_logging("INFO")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / f"demo-{args.size}"
    if not (checkpoint / "config.json").exists():
        make_demo_model(checkpoint, args.size)
    store = ModelStore(ModelRef(str(work / "store" / "bench")))
    if not store.backend.exists("manifest.json"):
        store.push(checkpoint)
    manifest = store.manifest()
    shm_dir = Path("/dev/shm/hydraserve-bench-loader")
    shm = ModelShm(shm_dir, store.ref.uri, store.ref.revision)
    RangeFetcher(
        store, manifest, shm, "full", manifest.fetch_ranges(None, None), FetchOptions(concurrency=4)
    ).run()
    (shm.dir / "manifest.json").write_text(manifest.model_dump_json())

    streaming = measure("streaming", shm.manifest_path, shm.weights_path, args.repeats)
    mapped = measure("safetensors", shm.manifest_path, shm.weights_path, args.repeats)
    copying = measure("copy", shm.manifest_path, shm.weights_path, args.repeats)
    total = manifest.total_bytes

    def gbps(run: dict[str, Any]) -> float:
        return round(total / float(run["adopt_seconds"] + run["touch_seconds"]) / 1e9, 3)

    data: dict[str, Any] = {
        "benchmark": "loader",
        "model_bytes": total,
        "model_size": args.size,
        "machine": machine_info(),
        "streaming_gbps": gbps(streaming),
        "safetensors_gbps": gbps(mapped),
        "copy_into_params_gbps": gbps(copying),
        "streaming_adopt_seconds": round(streaming["adopt_seconds"], 5),
        "peak_rss_over_model_bytes": round(streaming["peak_rss_growth_bytes"] / total, 3),
        "safetensors_peak_rss_over_model_bytes": round(mapped["peak_rss_growth_bytes"] / total, 3),
        "copy_into_params_peak_rss_over_model_bytes": round(
            copying["peak_rss_growth_bytes"] / total, 3
        ),
        "streaming": streaming,
        "safetensors": mapped,
        "copy_into_params": copying,
    }
    if not args.no_engine:
        data.update(engine_adoption(store.ref.uri, shm_dir, work))
    path = write_result("loader", data)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Shared memory → usable weights, {total / 1e9:.2f} GB bf16")
    for column in (
        "path",
        "GB/s (incl. first touch)",
        "adopt (s)",
        "touch (s)",
        "peak RSS growth / model",
        "anon growth / model",
    ):
        table.add_column(column, justify="right")
    for name, run in (
        ("HydraServe streaming (views of shm)", streaming),
        ("safetensors.load_file (mmap)", mapped),
        ("allocate params + copy (stock loaders)", copying),
    ):
        table.add_row(
            name,
            f"{gbps(run):.2f}",
            f"{run['adopt_seconds']:.4f}",
            f"{run['touch_seconds']:.3f}",
            f"{run['peak_rss_growth_bytes'] / total:.2f}",
            f"{run['anon_growth_bytes'] / total:.2f}",
        )
    Console(width=140).print(table)
    if "engine_weight_load_seconds" in data:
        Console().print(
            f"in a real vLLM worker: weight_load {data['engine_weight_load_seconds']} s, "
            f"anonymous memory growth {data['engine_anon_growth_bytes']} bytes, "
            f"{data['engine_adopted_zero_copy']} parameters adopted without a copy"
        )
    Console().print(f"wrote {path}")


if __name__ == "__main__":
    main()
