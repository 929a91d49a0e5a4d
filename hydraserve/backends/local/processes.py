"""Worker processes on this machine: ports, core sets, start and stop (thin, no policy)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from hydraserve.worker.config import WorkerConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def split_cores(cores: Sequence[int], parts: int) -> list[str]:
    """``cores`` in ``parts`` contiguous groups as VLLM_CPU_OMP_THREADS_BIND lists
    (``[0, 1, 2, 3]``, 2 → ``["0,1", "2,3"]``); with fewer cores than parts, groups share
    cores round-robin."""
    if not cores:
        raise ValueError("no cores to split")
    if len(cores) < parts:
        return [str(cores[i % len(cores)]) for i in range(parts)]
    size, extra = divmod(len(cores), parts)
    groups: list[str] = []
    start = 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        groups.append(",".join(str(c) for c in cores[start:end]))
        start = end
    return groups


def parse_cores(bind: str) -> list[int]:
    """The cores of a VLLM_CPU_OMP_THREADS_BIND list ("0,1", "0-3", "0-1,4")."""
    cores: list[int] = []
    for raw in bind.replace("|", ",").split(","):
        part = raw.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        cores += range(int(low), int(high or low) + 1)
    return list(dict.fromkeys(cores))


@dataclass
class StageProcess:
    rank: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def exited(self) -> int | None:
        return self.process.poll()


def worker_command(
    config_path: Path, exec_prefix: Sequence[str] = (), python: str | None = None
) -> list[str]:
    """``hydraserve worker --config ...`` with this interpreter (or ``python``: the warm
    runtime's shim), optionally inside a node (``exec_prefix``: e.g. ``ip netns exec
    <ns>`` for an emulated node)."""
    return [
        *exec_prefix,
        python or sys.executable,
        "-m",
        "hydraserve.cli.main",
        "worker",
        "--config",
        str(config_path),
    ]


def worker_env(
    base: Mapping[str, str],
    *,
    host: str,
    cache_root: Path,
    cpu_bind: str | None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of one stage process: vLLM binds and advertises ``host``, keeps its
    compile cache in ``cache_root`` and runs its threads on ``cpu_bind``."""
    env = dict(base)
    env.setdefault("VLLM_HOST_IP", host)
    env["VLLM_CACHE_ROOT"] = str(cache_root)
    if cpu_bind:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_bind
    env.update(extra or {})
    return env


def spawn_stage(
    directory: Path,
    config: WorkerConfig,
    env: Mapping[str, str],
    exec_prefix: Sequence[str] = (),
    python: str | None = None,
) -> StageProcess:
    """Start one stage in its own session (so its engine's children stop with it)."""
    config_path = directory / f"stage{config.rank}.json"
    config_path.write_text(config.model_dump_json())
    log_path = directory / f"stage{config.rank}.log"
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            worker_command(config_path, exec_prefix, python),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    return StageProcess(rank=config.rank, process=process, log_path=log_path)


def terminate(stages: Sequence[StageProcess], grace_s: float) -> None:
    """SIGTERM every stage's process group, SIGKILL what is left after ``grace_s``.
    Blocking: call it in a thread, never in the event loop."""
    for stage in stages:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stage.process.pid, signal.SIGTERM)
    deadline = time.time() + grace_s
    for stage in stages:
        with contextlib.suppress(subprocess.TimeoutExpired):
            stage.process.wait(max(0.0, deadline - time.time()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stage.process.pid, signal.SIGKILL)
        stage.process.wait()


def log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except FileNotFoundError:
        return ""
    return " | ".join(text[-lines:])


@dataclass
class WarmRuntime:
    """A node's warm runtime (decision 0600): its socket name and its process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    children_dir: Path  # a note per forked child: whom it was forked for


def start_warm_runtime(
    name: str,
    shim: Path,
    preload: Sequence[str],
    env: Mapping[str, str],
    log_path: Path,
    exec_prefix: Sequence[str] = (),
) -> WarmRuntime:
    """Start a node's warm runtime (inside the node: ``exec_prefix``) in its own session."""
    command = [*exec_prefix, sys.executable, "-m", "hydraserve.warm.server"]
    children_dir = log_path.with_suffix(".children")
    command += ["--name", name, "--shim", str(shim), "--children-dir", str(children_dir)]
    for module in preload:
        command += ["--preload", module]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
        )
    return WarmRuntime(name=name, process=process, log_path=log_path, children_dir=children_dir)


def stop_warm_runtime(runtime: WarmRuntime, grace_s: float) -> None:
    """Stop the runtime; workers it forked live on (each ends with its own stage)."""
    with contextlib.suppress(ProcessLookupError):
        runtime.process.terminate()
    try:
        runtime.process.wait(grace_s)
    except subprocess.TimeoutExpired:
        runtime.process.kill()
        runtime.process.wait()
