"""Push benchmark: what ``hydraserve model push`` costs in scratch disk, memory and time.

Pushes a demo checkpoint to a fresh store (local directory, or S3 with ``--s3``) while a
sampler thread records the bytes under the push's temp dir (its scratch space) and this
process's resident memory; then pushes again after an interruption part-way (the resumed
push must skip what was sent) and once more unchanged (everything skipped). Repeated
``--repeats`` times: the table shows the median and the spread.

``.venv/bin/python -m benchmarks.push.run --size 1g`` → ``benchmarks/results/push.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine_info, write_result
from hydraserve.store import ModelRef, ModelStore
from hydraserve.store.checkpoint import engine_architectures
from hydraserve.store.demo import make_demo_model
from hydraserve.worker.views import process_memory


class Sampler:
    """Peaks of scratch bytes (under ``scratch``), RSS and anonymous memory while a push
    runs."""

    def __init__(self, scratch: Path, period_s: float = 0.02) -> None:
        self.scratch = scratch
        self.period_s = period_s
        self.scratch_peak = 0
        self.rss_peak = 0
        self.anon_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            used = sum(p.stat().st_size for p in self.scratch.rglob("*") if p.is_file())
            self.scratch_peak = max(self.scratch_peak, used)
            memory = process_memory()
            self.rss_peak = max(self.rss_peak, memory["VmRSS"])
            self.anon_peak = max(self.anon_peak, memory["RssAnon"])
            time.sleep(self.period_s)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Stop(RuntimeError):
    pass


def one_run(checkpoint: Path, work: Path, part_bytes: int, concurrency: int) -> dict[str, Any]:
    scratch = work / "scratch"
    scratch.mkdir(parents=True)
    tempfile.tempdir = str(scratch)  # where any temporary file of the push would go
    ref = ModelRef(str(work / "store" / "m"))
    before = process_memory()
    store = ModelStore(ref)
    started = time.perf_counter()
    with Sampler(scratch) as sampler:
        manifest = store.push(checkpoint, part_bytes=part_bytes, concurrency=concurrency)
    seconds = time.perf_counter() - started
    size = manifest.weights_size

    # Interrupt a second push into a fresh store half-way, then resume it.
    ref2 = ModelRef(str(work / "store" / "m2"))
    interrupted = ModelStore(ref2)
    original = interrupted.backend.write
    sent = 0

    def write(key: str, data: bytes) -> None:
        nonlocal sent
        if ".parts/" in key and not key.endswith(".sha256"):
            if sent >= len(manifest.weights_parts) // 2:
                raise _Stop(key)
            sent += 1
        original(key, data)

    interrupted.backend.write = write  # type: ignore[method-assign]
    with contextlib.suppress(_Stop):
        interrupted.push(checkpoint, part_bytes=part_bytes, concurrency=1)
    resumed = ModelStore(ref2)
    started = time.perf_counter()
    resumed.push(checkpoint, part_bytes=part_bytes, concurrency=concurrency)
    resume_seconds = time.perf_counter() - started
    again = ModelStore(ref)
    started = time.perf_counter()
    again.push(checkpoint, part_bytes=part_bytes, concurrency=concurrency)
    unchanged_seconds = time.perf_counter() - started
    assert resumed.last_push is not None and again.last_push is not None
    tempfile.tempdir = None
    return {
        "weights_bytes": size,
        "push_seconds": seconds,
        "push_mb_per_s": size / seconds / 1e6,
        "scratch_peak_bytes": sampler.scratch_peak,
        # RSS counts the mapped checkpoint's pages (file-backed, reclaimable); the
        # anonymous growth is what the push itself holds (parts in flight).
        "rss_growth_peak_bytes": max(0, sampler.rss_peak - before["VmRSS"]),
        "anon_growth_peak_bytes": max(0, sampler.anon_peak - before["RssAnon"]),
        "resume_skipped_bytes": resumed.last_push.skipped_bytes,
        "resume_seconds": resume_seconds,
        "unchanged_skipped_bytes": again.last_push.skipped_bytes,
        "unchanged_seconds": unchanged_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1g", help="demo model size (tiny … 4g)")
    parser.add_argument("--part-mb", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench-push")
    args = parser.parse_args()
    part_bytes = args.part_mb << 20
    checkpoint = args.work / f"demo-{args.size}"
    if not (checkpoint / "config.json").exists():
        make_demo_model(checkpoint, args.size, seed=0)
    # The refusal check asks the installed vLLM which architectures it builds: a one-off
    # import per process, timed apart from the pushes.
    started = time.perf_counter()
    engine_architectures()
    engine_check_seconds = time.perf_counter() - started
    runs = []
    for i in range(args.repeats):
        work = args.work / f"run{i}"
        if work.exists():
            import shutil

            shutil.rmtree(work)
        runs.append(one_run(checkpoint, work, part_bytes, args.concurrency))
    keys = [k for k in runs[0] if k != "weights_bytes"]
    summary = {
        k: {
            "median": statistics.median(r[k] for r in runs),
            "min": min(r[k] for r in runs),
            "max": max(r[k] for r in runs),
        }
        for k in keys
    }
    print(f"push of the {args.size} demo model ({runs[0]['weights_bytes'] / 1e6:.0f} MB), "
          f"{args.part_mb} MB parts, {args.concurrency} uploads in flight, local store, "
          f"{args.repeats} runs")  # fmt: skip
    print(f"{'metric':28} {'median':>14} {'min':>14} {'max':>14}")
    for k, v in summary.items():
        print(f"{k:28} {v['median']:>14.3f} {v['min']:>14.3f} {v['max']:>14.3f}")
    path = write_result(
        "push",
        {
            "machine": machine_info(),
            "regime": {
                "model": args.size,
                "part_bytes": part_bytes,
                "concurrency": args.concurrency,
                "store": "local directory",
            },
            "engine_check_seconds": engine_check_seconds,
            "runs": runs,
            "summary": summary,
            "scratch_limit_bytes": 2 * part_bytes,
            "scratch_under_two_parts": all(r["scratch_peak_bytes"] < 2 * part_bytes for r in runs),
        },
    )
    print(f"(before the pushes: {engine_check_seconds:.1f} s to ask vLLM for its architectures)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
