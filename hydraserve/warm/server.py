"""A node's warm runtime: imports the engine once, then forks a child for each Python
command a client asks for (decision 0600).

``python -m hydraserve.warm.server --name NAME --shim PATH [--preload MODULE[:FUNCTION]]...``

The child becomes the client's process in every way a worker can observe: its network
and mount namespaces (a sandboxed worker stays sandboxed), its user, groups and
capabilities, its cores, working directory, environment, argv and open descriptors (at the
same numbers). It runs the command as the interpreter would (``-c``, ``-m``, a script) and
dies with the client. Everything a child starts with Python (vLLM's engine core, its
registry probe, pipeline workers) goes through the shim at ``--shim`` and so comes from
here too.

The loop is single-threaded, so forking from it is as safe as vLLM's own fork start
method (the engine is imported, nothing has run). It must never run a model itself.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import ctypes.util
import fcntl
import importlib
import multiprocessing
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from hydraserve.logs import get_logger
from hydraserve.warm.protocol import address, parse_command, recv_request, send_event
from hydraserve.warm.tree import forget_child, record_child

log = get_logger("warm.server")

PR_CAPBSET_DROP = 24
CAP_LAST = 40
HIGH_FD = 512
REQUEST_TIMEOUT_S = 10.0


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def enter_namespaces(pid: int) -> None:
    """Join ``pid``'s network and mount namespaces where they differ from ours."""
    libc = _libc()
    for kind in ("net", "mnt"):
        theirs = f"/proc/{pid}/ns/{kind}"
        if os.readlink(theirs) == os.readlink(f"/proc/self/ns/{kind}"):
            continue
        fd = os.open(theirs, os.O_RDONLY)
        try:
            _check(libc.setns(fd, 0), f"joining {kind} namespace of {pid}")
        finally:
            os.close(fd)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def match_credentials(pid: int) -> None:
    """Take ``pid``'s user, groups and capabilities (never more than we hold)."""
    status = _status(pid)
    libc = _libc()
    bounding = int(status["CapBnd"], 16)
    for cap in range(CAP_LAST + 1):
        if not bounding & (1 << cap):
            with contextlib.suppress(OSError):  # caps this kernel does not know
                _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping cap {cap}")
    uid = int(status["Uid"].split()[0])
    gid = int(status["Gid"].split()[0])
    groups = [int(g) for g in status.get("Groups", "").split()]
    if (uid, gid) != (os.getuid(), os.getgid()):
        os.setgroups(groups)
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # drops every capability when uid is not 0
    if os.geteuid() == 0:
        header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
        data = (_CapData * 2)()
        for key, attr in (
            ("CapEff", "effective"),
            ("CapPrm", "permitted"),
            ("CapInh", "inheritable"),
        ):
            value = int(status[key], 16)
            setattr(data[0], attr, value & 0xFFFFFFFF)
            setattr(data[1], attr, value >> 32)
        _check(libc.capset(ctypes.byref(header), data), "setting capabilities")


def install_descriptors(received: Sequence[int], targets: Sequence[int], keep: int) -> int:
    """Put each received descriptor at its target number, close every other one but
    ``keep``; returns ``keep``'s new number."""
    # First everything out of the way, above any target, so no dup2 overwrites a source.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, HIGH_FD) for fd in received]
    keep = fcntl.fcntl(keep, fcntl.F_DUPFD_CLOEXEC, HIGH_FD)
    for fd, target in zip(moved, targets, strict=True):
        os.dup2(fd, target, inheritable=True)
    wanted = {*targets, keep}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in wanted:
            with contextlib.suppress(OSError):
                os.close(fd)
    return keep


def run_command(argv: list[str]) -> int:
    """Run a Python command line as the interpreter would; its exit code."""
    parsed = parse_command(argv)
    if parsed is None:  # the client checked; a request that gets here anyway is refused
        sys.stderr.write(f"warm runtime: cannot run {argv!r}\n")
        return 2
    kind, target, args = parsed
    try:
        if kind == "c":
            sys.argv = ["-c", *args]
            sys.path.insert(0, "")
            main = types.ModuleType("__main__")
            main.__dict__["__builtins__"] = __builtins__
            sys.modules["__main__"] = main
            exec(compile(target, "<string>", "exec"), main.__dict__)
        elif kind == "m":
            sys.argv = [target, *args]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            sys.argv = [target, *args]
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
    except SystemExit as exc:
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        sys.stderr.write(f"{exc.code}\n")  # as the interpreter reports sys.exit("text")
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def wait_for_client_exit(conn: socket.socket) -> int:
    """Block until the client's end of ``conn`` closes (it exits or is killed); the bytes it
    sent meanwhile. Blocking whatever the descriptor's flags: a socket timeout makes the open
    file non-blocking for every copy of it, and a watchdog that took ``EAGAIN`` for the
    client's end killed a healthy child (CI: a tensor-parallel worker, SIGKILLed at start)."""
    conn.setblocking(True)
    received = 0
    while True:
        try:
            data = conn.recv(4096)
        except ConnectionError:
            return received
        if not data:
            return received
        received += len(data)


def _die_with_client(conn: socket.socket) -> None:
    """The client's end closes when it exits (or is killed): so does this child."""
    try:
        wait_for_client_exit(conn)
    finally:
        os.killpg(0, signal.SIGKILL)


def end_child(code: int) -> NoReturn:
    """End a forked child as the interpreter ends a command, minus tearing down what the
    runtime imported: wait for the command's non-daemon threads, run the exit handlers,
    flush the standard streams, then leave with ``os._exit`` (as multiprocessing's forked
    children do). Finalising a heap the size of torch's and vLLM's took ~3 s per child
    (measured: a warm ``python -c "print(1)"`` 3.0 s, 0.17 s this way, 0.03 s cold), which
    every short helper paid: Inductor's ISA probes on an eager engine's first request with
    logprobs made that request ~19 s instead of ~2.5 s."""
    main = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main and not thread.daemon:
            thread.join()
    try:
        atexit._run_exitfuncs()  # what interpreter shutdown runs; the module has no public one
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def become_child(
    conn: socket.socket, request: dict[str, Any], fds: list[int], peer: int
) -> NoReturn:
    """In the forked child: turn into the client's process, run its command, end."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    enter_namespaces(peer)
    match_credentials(peer)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.sched_setaffinity(0, os.sched_getaffinity(peer))
    keep = install_descriptors(fds, request["fds"], conn.fileno())
    watchdog = socket.socket(fileno=keep)
    threading.Thread(target=_die_with_client, args=(watchdog,), daemon=True).start()
    end_child(run_command(list(request["argv"])))


def run_preload(entry: str) -> None:
    """Import ``module``, or import ``module:function`` and call the function once (work
    every child would repeat, done before the fork so the children share its result)."""
    module_name, _, function = entry.partition(":")
    module = importlib.import_module(module_name)
    if function:
        getattr(module, function)()


def serve(name: str, shim: Path, preload: Sequence[str], children_dir: Path | None = None) -> int:
    """Serve until SIGTERM; in a forked child, the child's exit code."""
    # Every Python process started from here on (and from our children) is a warm one:
    # set before the preload, so modules that remember the interpreter remember the shim.
    sys.executable = str(shim)
    multiprocessing.set_executable(str(shim))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address(name))  # bound first: early clients wait instead of failing
    listener.listen(64)
    started = time.monotonic()
    for entry in preload:
        try:
            run_preload(entry)
        except Exception as exc:  # a module this platform lacks: the child imports it
            log.warning("warm.preload_failed", runtime=name, module=entry, error=str(exc))
    log.info(
        "warm.ready",
        runtime=name,
        preload_s=round(time.monotonic() - started, 3),
        threads=len(os.listdir("/proc/self/task")),
    )
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    clients: dict[int, socket.socket] = {}
    while not stopping:
        for key, _ in selector.select(timeout=1.0):
            if key.fileobj is listener:
                conn, _addr = listener.accept()
                try:
                    conn.settimeout(REQUEST_TIMEOUT_S)
                    request, fds = recv_request(conn)
                    creds = conn.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                    )
                    peer = struct.unpack("3i", creds)[0]
                    conn.settimeout(None)  # before the fork: the child inherits the open file
                    sys.stdout.flush()
                    sys.stderr.flush()
                    pid = os.fork()
                except Exception as exc:
                    log.warning("warm.request_failed", runtime=name, error=str(exc))
                    conn.close()
                    continue
                if pid == 0:
                    selector.close()
                    listener.close()
                    for other in clients.values():
                        other.close()
                    os.close(wake_r)
                    os.close(wake_w)
                    become_child(conn, request, fds, peer)
                for fd in fds:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    send_event(conn, {"pid": pid})
                clients[pid] = conn
                if children_dir is not None:
                    record_child(children_dir, pid, peer)
                log.info("warm.forked", runtime=name, pid=pid, argv=request["argv"][:3])
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 512)
        _reap(clients, children_dir)
    return 0


def _reap(clients: dict[int, socket.socket], children_dir: Path | None) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if children_dir is not None:
            forget_child(children_dir, pid)
        conn = clients.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):
                send_event(conn, {"exit": os.waitstatus_to_exitcode(status)})
            conn.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="the socket name clients ask for")
    parser.add_argument("--shim", type=Path, required=True, help="the warm python shim")
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        help="a module to import, or module:function to call once before serving",
    )
    parser.add_argument(
        "--children-dir", type=Path, help="where to note each child and whom it is for"
    )
    args = parser.parse_args(argv)
    sys.exit(serve(args.name, args.shim, args.preload, args.children_dir))


if __name__ == "__main__":
    main()
