"""Loader benchmark: the streaming property, and adoption against other loaders.

1. **Streaming property**: a real vLLM worker (the product's defaults) starts while the
   node's fetch is still arriving, throttled to ``--stream-mbps`` so that the last byte
   lands well after the engine could have been ready; measured: seconds from the last
   byte verified (the fetch's ``finished_at``) to the engine ready (``/health``), over
   ``--stream-runs`` runs. Beside it, the same worker on bytes already present: its
   engine start is what a fetch-then-start loader adds after the last byte.
2. **Adoption** of the same bytes by HydraServe's streaming loader (views of the file),
   ``safetensors.torch.load_file``, a multi-threaded copying loader (threads ``pread``
   the file into allocated parameters) and a one-thread copy; each run a fresh process,
   every byte touched once (page faults included), ``--repeats`` runs each, in two cache
   states that every side shares: *warm* (the node's ``/dev/shm`` file: tmpfs, in memory
   by construction) and *cold* (the same bytes in a file on disk whose pages are evicted
   with ``fsync`` + ``posix_fadvise(DONTNEED)`` before every run of every side, checked).

``.venv/bin/python -m benchmarks.loader.run --size 1g`` → ``benchmarks/results/loader.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result
from benchmarks.stats import rounded, spread
from hydraserve.logs import configure_logging, get_logger
from hydraserve.prefetcher.fetcher import FetchOptions, RangeFetcher
from hydraserve.prefetcher.shm import FetchState, ModelShm, fetch_name
from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.demo import make_demo_model
from hydraserve.worker.timeline import read_timeline

log = get_logger("bench.loader")


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``mincore`` over a read-only mapping)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long,
    ]  # fmt: skip
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            if libc.mincore(address, size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) * mmap.PAGESIZE


def evict(path: Path) -> int:
    """Drop ``path``'s pages from the page cache (this file only); returns bytes left."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return resident_bytes(path)


def measure(
    mode: str, manifest: Path, weights: Path, repeats: int, *, cold: bool, threads: int
) -> dict[str, Any]:
    """``repeats`` fresh-process runs of one loading path; the median and the spread."""
    runs = []
    for _ in range(repeats):
        left = evict(weights) if cold else None
        out = subprocess.run(
            [
                sys.executable, "-m", "benchmarks.loader.measure", mode, str(manifest),
                str(weights), str(threads),
            ],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        run = json.loads(out.stdout.strip().splitlines()[-1])
        run["total_seconds"] = run["adopt_seconds"] + run["touch_seconds"]
        run["resident_bytes_before"] = left
        runs.append(run)
    total = runs[0]["bytes"]
    return {
        "mode": mode,
        "threads": runs[0]["threads"],
        "total_seconds": rounded(spread([r["total_seconds"] for r in runs]), 4),
        "gbps": rounded(spread([total / r["total_seconds"] / 1e9 for r in runs])),
        "adopt_seconds": rounded(spread([r["adopt_seconds"] for r in runs]), 5),
        "peak_rss_over_model": rounded(spread([r["peak_rss_growth_bytes"] / total for r in runs])),
        "anon_over_model": rounded(spread([r["anon_growth_bytes"] / total for r in runs])),
        "runs": runs,
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_fetch(
    store: ModelStore, manifest: Any, shm: ModelShm, bytes_per_s: float | None
) -> threading.Thread:
    """The node's whole-model fetch into ``shm`` in a thread, throttled to ``bytes_per_s``
    (None: as fast as the store serves). Published as FETCHING before it returns, as the
    prefetcher does, so a worker started next streams from it instead of fetching itself."""
    shm.dir.mkdir(parents=True, exist_ok=True)
    (shm.dir / "manifest.json").write_text(manifest.model_dump_json())
    options = FetchOptions(concurrency=1, chunk_bytes=8 << 20)

    def gate() -> None:
        if bytes_per_s:
            time.sleep(options.chunk_bytes / bytes_per_s)

    name = fetch_name(None, None)
    fetcher = RangeFetcher(
        store, manifest, shm, name, manifest.fetch_ranges(None, None), options, gate=gate
    )
    shm.write_status(name, fetcher.status.model_copy(update={"state": FetchState.FETCHING}))
    thread = threading.Thread(target=fetcher.run, name="bench-fetch", daemon=True)
    thread.start()
    return thread


def worker_run(
    store: ModelStore, manifest: Any, work: Path, *, bytes_per_s: float | None, label: str
) -> dict[str, Any]:
    """One real worker on a fresh shared-memory directory: with ``bytes_per_s`` it starts
    while the fetch arrives; with None the bytes are all present before it starts."""
    from hydraserve.worker.config import WorkerConfig

    shm_dir = Path(f"/dev/shm/hydraserve-bench-loader-{label}")
    shutil.rmtree(shm_dir, ignore_errors=True)
    shm = ModelShm(shm_dir, store.ref.uri, store.ref.revision)
    thread = start_fetch(store, manifest, shm, bytes_per_s)
    if bytes_per_s is None:
        thread.join()
    timeline = work / f"timeline-{label}.jsonl"
    timeline.unlink(missing_ok=True)
    config = WorkerConfig(
        model_name="bench", uri=store.ref.uri, instance=f"loader-{label}", port=free_port(),
        shm_dir=shm_dir, timeline=timeline, max_model_len=256, kv_cache_bytes=64 << 20,
    )  # fmt: skip
    path = work / f"worker-{label}.json"
    path.write_text(config.model_dump_json())
    env = {**os.environ, "VLLM_HOST_IP": "127.0.0.1", "VLLM_CACHE_ROOT": str(work / "cache")}
    launched = time.time()
    with open(work / f"worker-{label}.log", "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hydraserve.cli.main", "worker", "--config", str(path)],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.time() + 900
        events: dict[str, dict[str, Any]] = {}
        while "engine_init" not in events:
            if time.time() > deadline:
                raise TimeoutError(f"worker {label} not ready; see {work}/worker-{label}.log")
            if proc.poll() is not None:
                raise RuntimeError(f"worker {label} exited; see {work}/worker-{label}.log")
            events = {e["stage"]: e for e in read_timeline(timeline)}
            time.sleep(0.05)
        thread.join()
        status = shm.read_status(fetch_name(None, None))
        assert status is not None and status.state == FetchState.DONE, status
        assert status.finished_at is not None
        health = float(events["engine_init"]["end"])
        load = events.get("weight_load", {})
        # The control plane routes to an instance once it is healthy and every byte is
        # verified (decision 0004), so ready is the later of the two.
        ready = max(health, status.finished_at)
        return {
            "label": label,
            "fetch_mbps": None if bytes_per_s is None else round(bytes_per_s * 8 / 1e6, 1),
            "fetch_seconds": round(status.finished_at - (status.started_at or launched), 3),
            "worker_launch_to_ready_s": round(ready - launched, 3),
            "last_byte_verified_to_ready_s": round(ready - status.finished_at, 3),
            "health_minus_last_byte_s": round(health - status.finished_at, 3),
            "weight_load_seconds": round(
                float(load.get("end", 0)) - float(load.get("start", 0)), 4
            ),
            "weight_load_waited_s": load.get("waited_s"),
            "weights_adopted_zero_copy": load.get("adopted_zero_copy"),
            "anon_growth_bytes": load.get("anon_growth_bytes"),
            "enforce_eager": config.enforce_eager,
            "inprocess_engine": config.inprocess_engine,
        }
    finally:
        os.killpg(proc.pid, 9)
        proc.wait()
        shutil.rmtree(shm_dir, ignore_errors=True)


def streaming_property(
    store: ModelStore, manifest: Any, work: Path, *, mbps: float, runs: int
) -> dict[str, Any]:
    present = [
        worker_run(store, manifest, work, bytes_per_s=None, label=f"present-{i}")
        for i in range(runs)
    ]
    streaming = [
        worker_run(store, manifest, work, bytes_per_s=mbps * 1e6 / 8, label=f"stream-{i}")
        for i in range(runs)
    ]
    return {
        "model_bytes": manifest.total_bytes,
        "fetch_mbps": mbps,
        "last_byte_verified_to_ready_s": rounded(
            spread([r["last_byte_verified_to_ready_s"] for r in streaming])
        ),
        "fetch_seconds": rounded(spread([r["fetch_seconds"] for r in streaming])),
        "launch_to_ready_s": rounded(spread([r["worker_launch_to_ready_s"] for r in streaming])),
        # With every byte present, the engine's start is what a fetch-then-start loader
        # adds after the last byte.
        "engine_start_bytes_present_s": rounded(
            spread([r["worker_launch_to_ready_s"] for r in present])
        ),
        "streaming_runs": streaming,
        "present_runs": present,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1g")
    parser.add_argument("--repeats", type=int, default=3, help="runs per loader and cache state")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="mtcopy threads")
    parser.add_argument("--work-dir", default="/tmp/hydraserve-bench-loader")
    parser.add_argument("--stream-runs", type=int, default=3)
    parser.add_argument(
        "--stream-mbps", type=float, default=200.0, help="throttled fetch for the streaming runs"
    )
    parser.add_argument("--no-engine", action="store_true", help="skip the real-worker runs")
    args = parser.parse_args()
    configure_logging("INFO")
    started = time.perf_counter()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = work / f"demo-{args.size}"
    if not (checkpoint / "config.json").exists():
        make_demo_model(checkpoint, args.size)
    store = ModelStore(ModelRef(str(work / "store" / "bench")))
    if not store.backend.exists("manifest.json"):
        store.push(checkpoint)
    manifest = store.manifest()
    total = manifest.total_bytes

    # The same bytes twice: the node's shared-memory file (tmpfs) and a file on disk.
    shm_dir = Path("/dev/shm/hydraserve-bench-loader")
    shm = ModelShm(shm_dir, store.ref.uri, store.ref.revision)
    start_fetch(store, manifest, shm, None).join()
    disk = work / "disk" / "model.safetensors"
    disk.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shm.weights_path, disk)
    states = {
        "warm": (shm.weights_path, False, "the node's /dev/shm file (tmpfs: in memory)"),
        "cold": (disk, True, "a file on disk, its pages evicted before every run"),
    }
    modes = {
        "streaming": "HydraServe streaming loader (views of the file)",
        "safetensors": "safetensors.torch.load_file",
        "mtcopy": f"multi-threaded copying loader ({args.threads} threads, pread)",
        "copy": "allocate params + copy (one thread)",
    }
    adoption: dict[str, dict[str, Any]] = {}
    for state, (weights, cold, _) in states.items():
        adoption[state] = {}
        for mode in modes:
            adoption[state][mode] = measure(
                mode, shm.manifest_path, weights, args.repeats, cold=cold, threads=args.threads
            )
            log.info(
                "loader.measured", state=state, mode=mode,
                gbps=adoption[state][mode]["gbps"]["median"],
            )  # fmt: skip
    data: dict[str, Any] = {
        "benchmark": "loader",
        "model_bytes": total,
        "model_size": args.size,
        "machine": {**machine_info(), "load_average_at_start": list(os.getloadavg())},
        "cache_states": {k: v[2] for k, v in states.items()},
        "loaders": modes,
        "repeats": args.repeats,
        "adoption": adoption,
        "streaming_gbps_warm": adoption["warm"]["streaming"]["gbps"]["median"],
        "safetensors_gbps_warm": adoption["warm"]["safetensors"]["gbps"]["median"],
        "mtcopy_gbps_warm": adoption["warm"]["mtcopy"]["gbps"]["median"],
    }
    if not args.no_engine:
        data["streaming_property"] = streaming_property(
            store, manifest, work, mbps=args.stream_mbps, runs=args.stream_runs
        )
        data["last_byte_verified_to_ready_s"] = data["streaming_property"][
            "last_byte_verified_to_ready_s"
        ]
    shutil.rmtree(shm_dir, ignore_errors=True)
    data["benchmark_wall_seconds"] = round(time.perf_counter() - started, 1)
    path = write_result("loader", data)

    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    for state, (_, _, description) in states.items():
        table = Table(
            title=f"{total / 1e9:.2f} GB bf16 -> usable, touched weights; {state}: {description}; "
            f"median (min-max) of {args.repeats} runs"
        )
        for column in (
            "loader",
            "GB/s",
            "seconds",
            "adopt (s)",
            "peak RSS / model",
            "anon / model",
        ):
            table.add_column(column, justify="right")
        for mode, label in modes.items():
            r = adoption[state][mode]
            g, t = r["gbps"], r["total_seconds"]
            table.add_row(
                label, f"{g['median']:.2f} ({g['min']:.2f}-{g['max']:.2f})",
                f"{t['median']:.3f} ({t['min']:.3f}-{t['max']:.3f})",
                f"{r['adopt_seconds']['median']:.4f}",
                f"{r['peak_rss_over_model']['median']:.2f}",
                f"{r['anon_over_model']['median']:.2f}",
            )  # fmt: skip
        console.print(table)
    if "streaming_property" in data:
        sp = data["streaming_property"]
        table = Table(
            title=f"Real vLLM worker, fetch throttled to {sp['fetch_mbps']:g} Mbit/s; "
            f"median (min-max) of {args.stream_runs} runs"
        )
        for column in ("measure", "median", "min-max"):
            table.add_column(column, justify="right")
        for key, label in (
            ("last_byte_verified_to_ready_s", "last byte verified -> engine ready (s)"),
            ("fetch_seconds", "fetch (s)"),
            ("launch_to_ready_s", "worker launch -> ready, streaming (s)"),
            ("engine_start_bytes_present_s", "worker launch -> ready, bytes present (s)"),
        ):
            v = sp[key]
            table.add_row(label, f"{v['median']:.2f}", f"{v['min']:.2f}-{v['max']:.2f}")
        console.print(table)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
