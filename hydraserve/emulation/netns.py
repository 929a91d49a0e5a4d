"""An emulated cluster on one machine: nodes as network namespaces with shaped links.

Topology (all names carry a run id so concurrent runs never collide)::

    root ns ── veth ──┐
                      │  store ns: bridge 10.X.0.1, the S3 server
    node ns 0 ── veth ┤  (each node link: tbf at ``rate_mbit`` on both ends)
    node ns 1 ── veth ┘

Each node gets its own shared-memory directory (namespaces share /dev/shm, real nodes do
not) and its own node prefetcher. Traffic stays inside these namespaces and loopback;
the root namespace reaches them through one unshaped veth, for clients and control.
Everything is removed on exit, on exceptions and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType

import httpx

from hydraserve.logs import get_logger

log = get_logger("cluster.netns")

S3_PORT = 9000
PREFETCHER_PORT = 8300


class EmulationUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, or iproute2 missing)."""


@dataclass
class EmulatedNode:
    index: int
    ns: str
    ip: str
    shm_dir: Path
    iface: str = "eth0"

    @property
    def name(self) -> str:
        return f"node-{self.index}"

    @property
    def prefetcher_url(self) -> str:
        return f"http://{self.ip}:{PREFETCHER_PORT}"


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result


def check_available() -> None:
    if os.geteuid() != 0:
        raise EmulationUnavailable("network namespaces need root (run as root, as CI does)")
    if shutil.which("ip") is None or shutil.which("tc") is None:
        raise EmulationUnavailable("iproute2 (`ip`, `tc`) is not installed")


@dataclass
class EmulatedCluster:
    nodes: int
    rate_mbit: float
    shm_root: Path = Path("/dev/shm/hydraserve-emulated")
    run_id: str = field(default_factory=lambda: f"{random.randrange(16**4):04x}")
    subnet: int = field(default_factory=lambda: random.randrange(100, 250))
    start_prefetchers: bool = True
    prefetcher_env: dict[str, str] = field(default_factory=dict)
    node_list: list[EmulatedNode] = field(default_factory=list, init=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False)
    _namespaces: list[str] = field(default_factory=list, init=False)
    _root_link: str | None = field(default=None, init=False)
    _old_handlers: dict[int, object] = field(default_factory=dict, init=False)
    log_dir: Path | None = None

    # -- addresses -------------------------------------------------------------------

    @property
    def store_ns(self) -> str:
        return f"hs{self.run_id}s"

    @property
    def store_ip(self) -> str:
        return f"10.{self.subnet}.0.1"

    @property
    def root_ip(self) -> str:
        return f"10.{self.subnet}.0.254"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.store_ip}:{S3_PORT}"

    # -- lifecycle ---------------------------------------------------------------------

    def __enter__(self) -> EmulatedCluster:
        check_available()
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        atexit.register(self.teardown)
        try:
            self._setup_network()
            self._start_store()
            if self.start_prefetchers:
                for node in self.node_list:
                    self._start_prefetcher(node)
                self._wait_prefetchers()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.teardown()
        previous = self._old_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    def _setup_network(self) -> None:
        store = self.store_ns
        _run("ip", "netns", "add", store)
        self._namespaces.append(store)
        _run("ip", "-n", store, "link", "set", "lo", "up")
        _run("ip", "-n", store, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", store, "addr", "add", f"{self.store_ip}/24", "dev", "br0")
        _run("ip", "-n", store, "link", "set", "br0", "up")
        for i in range(self.nodes):
            ns = f"hs{self.run_id}n{i}"
            _run("ip", "netns", "add", ns)
            self._namespaces.append(ns)
            host_end, node_end = f"hs{self.run_id}h{i}", f"hs{self.run_id}v{i}"
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _run("ip", "link", "set", host_end, "netns", store)
            _run("ip", "link", "set", node_end, "netns", ns)
            _run("ip", "-n", ns, "link", "set", node_end, "name", "eth0")
            ip = f"10.{self.subnet}.0.{10 + i}"
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            _run("ip", "-n", ns, "link", "set", "eth0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", store, "link", "set", host_end, "master", "br0", "up")
            for where, dev in ((ns, "eth0"), (store, host_end)):
                _run(
                    "tc",
                    "-n",
                    where,
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    f"{self.rate_mbit}mbit",
                    "burst",
                    "256kb",
                    "latency",
                    "50ms",
                )
            shm = self.shm_root / self.run_id / f"node-{i}"
            shm.mkdir(parents=True, exist_ok=True)
            self.node_list.append(EmulatedNode(index=i, ns=ns, ip=ip, shm_dir=shm))
        # The root namespace's door into the cluster network (control and clients only).
        root_end, bridge_end = f"hs{self.run_id}r", f"hs{self.run_id}b"
        _run("ip", "link", "add", root_end, "type", "veth", "peer", "name", bridge_end)
        self._root_link = root_end
        _run("ip", "link", "set", bridge_end, "netns", store)
        _run("ip", "-n", store, "link", "set", bridge_end, "master", "br0", "up")
        _run("ip", "addr", "add", f"{self.root_ip}/24", "dev", root_end)
        _run("ip", "link", "set", root_end, "up")
        log.info(
            "netns.up",
            run=self.run_id,
            nodes=self.nodes,
            rate_mbit=self.rate_mbit,
            subnet=f"10.{self.subnet}.0.0/24",
        )

    def _log_file(self, name: str) -> int | None:
        if self.log_dir is None:
            return subprocess.DEVNULL
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return os.open(self.log_dir / f"{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def spawn(
        self,
        ns: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        log_name: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start a process inside a namespace; it is killed at teardown."""
        out = self._log_file(log_name) if log_name else subprocess.DEVNULL
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
            env={**os.environ, **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if isinstance(out, int) and out > 2:
            os.close(out)
        self._procs.append(proc)
        return proc

    def _start_store(self) -> None:
        # The store stands for its own servers: it gets the CPU before the emulated nodes'
        # processes on this shared machine.
        server = [sys.executable, "-m", "moto.server", "-H", self.store_ip, "-p", str(S3_PORT)]
        self.spawn(self.store_ns, ["nice", "-n", "-10", *server], log_name="s3")
        _wait_http(f"{self.s3_endpoint}/", timeout=60)

    def _start_prefetcher(self, node: EmulatedNode) -> None:
        env = {
            "HYDRASERVE_S3__ENDPOINT_URL": self.s3_endpoint,
            "HYDRASERVE_SHM_DIR": str(node.shm_dir),
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing"),
            **self.prefetcher_env,
        }
        self.spawn(
            node.ns,
            [
                sys.executable,
                "-m",
                "hydraserve.cli.main",
                "prefetcher",
                "--host",
                node.ip,
                "--port",
                str(PREFETCHER_PORT),
                "--node",
                node.name,
            ],
            env=env,
            log_name=f"prefetcher-{node.index}",
        )

    def _wait_prefetchers(self) -> None:
        for node in self.node_list:
            _wait_http(f"{node.prefetcher_url}/healthz", timeout=60)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def teardown(self) -> None:
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.time() + 5
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.time()))
            self.kill(proc)
        self._procs.clear()
        for ns in reversed(self._namespaces):
            _run("ip", "netns", "del", ns, check=False)
        self._namespaces.clear()
        if self._root_link:
            _run("ip", "link", "del", self._root_link, check=False)
            self._root_link = None
        shutil.rmtree(self.shm_root / self.run_id, ignore_errors=True)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._old_handlers.clear()
        with contextlib.suppress(Exception):
            atexit.unregister(self.teardown)


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    last: Exception | None = None
    while time.time() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError as exc:
            last = exc
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s: {last}")
