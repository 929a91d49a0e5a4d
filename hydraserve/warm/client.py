"""The warm python shim: a command line that behaves like ``python`` but asks the node's
warm runtime to run it in a child forked from an interpreter that has already imported the
engine (decision 0600).

Used as a worker's interpreter and, inside the worker, as ``sys.executable`` for every
Python process the engine starts. It forwards its descriptors, environment, working
directory and argv; relays SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 to the
child's process group; and exits as the child did. Without a runtime (none configured,
none reachable, a command line it cannot run warm) it execs the real interpreter, so a
start is never lost, only cold. Stdlib only: it must start in milliseconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import sys
import time
from pathlib import Path

from hydraserve.warm.protocol import (
    ENV_CLIENT_STARTED,
    ENV_SOCKET,
    address,
    parse_command,
    send_request,
)

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


def _open_descriptors() -> list[int]:
    names = os.listdir("/proc/self/fd")  # its own descriptor is closed again by now
    fds = []
    for name in names:
        fd = int(name)
        with contextlib.suppress(OSError):
            os.fstat(fd)
            fds.append(fd)
    return sorted(fds)


def _cold(real_python: str, argv: list[str], why: str) -> None:
    if why:
        # The shim's one line of its own, on the worker's stderr (stdlib only: no logger).
        sys.stderr.write(f"hydraserve warm runtime: {why}; starting cold\n")
        sys.stderr.flush()
    os.execv(real_python, [real_python, *argv])


def main(real_python: str, argv: list[str] | None = None) -> int:
    started = time.time()
    argv = sys.argv[1:] if argv is None else argv
    name = os.environ.get(ENV_SOCKET)
    if not name:
        _cold(real_python, argv, "")
    if parse_command(argv) is None:
        _cold(real_python, argv, "")
    fds = _open_descriptors()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address(str(name)))
        env = {**os.environ, ENV_CLIENT_STARTED: repr(started)}
        request = {"argv": argv, "env": env, "cwd": os.getcwd(), "fds": fds}
        send_request(sock, request, fds)
        reader = sock.makefile("rb")
        first = reader.readline()
    except OSError as exc:
        sock.close()
        _cold(real_python, argv, f"{name} unreachable ({exc})")
    if not first:  # refused before the child ran: nothing started, so start it cold
        _cold(real_python, argv, f"{name} refused the request")
    pid = int(json.loads(first)["pid"])

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    for line in reader:
        event = json.loads(line)
        if "exit" in event:
            code = int(event["exit"])
            if code < 0:  # ended by a signal: end the same way
                if -code not in (signal.SIGKILL, signal.SIGSTOP):  # those take no handler
                    signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            return code
    return 1  # the runtime went away; the child's fate is unknown


SHIM = """#!{python}
import sys
from hydraserve.warm.client import main
sys.exit(main({python!r}))
"""


def write_shim(path: Path, real_python: str | None = None) -> Path:
    """An executable file that runs this shim with ``real_python`` as the fallback."""
    python = real_python or sys.executable
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(SHIM.format(python=python))
    tmp.chmod(
        tmp.stat().st_mode
        | stat.S_IXUSR
        | stat.S_IXGRP
        | stat.S_IXOTH
        | stat.S_IRGRP
        | stat.S_IROTH
    )
    tmp.replace(path)
    return path
