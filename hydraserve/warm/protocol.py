"""The warm runtime's wire contract (defined once, used by the server and the client).

A client connects to the server's abstract Unix socket (abstract names are per network
namespace: each node's workers reach their own node's server) and sends one request: a
4-byte big-endian length, then JSON ``{"argv", "env", "cwd", "fds"}``; the file
descriptors named in ``fds`` travel in the same message as ``SCM_RIGHTS``, in that order,
and the child gets each at the number it had in the client. The server answers with JSON
lines: ``{"pid": N}`` once the child runs, ``{"exit": code}`` when it ends (a negative code
is the signal that ended it, as ``subprocess`` reports it). The connection stays open for
the child's life: when the client goes away, the child is killed.

Only stdlib here: the client must start in milliseconds.
"""

from __future__ import annotations

import array
import json
import socket
import struct
from typing import Any

ENV_SOCKET = "HYDRASERVE_WARM_RUNTIME"  # the server's name, set in a worker's environment
# Set by the client in its child's environment: when the client started (wall clock), so a
# child's start-up counts the wait for a runtime still preloading (the child's own creation
# time is the fork, after that wait).
ENV_CLIENT_STARTED = "HYDRASERVE_WARM_CLIENT_STARTED"
MAX_FDS = 64
MAX_REQUEST_BYTES = 4 << 20
# Ancillary buffer for the most descriptors one request may carry.
CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def address(name: str) -> str:
    """The abstract socket address of a server called ``name``."""
    return "\0hydraserve-warm-" + name


def send_request(sock: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    body = json.dumps(request).encode()
    header = struct.pack(">I", len(body))
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([header + body], ancillary)
    # Nothing more is sent: the server reads to the announced length.


def recv_request(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request and the descriptors that came with it (the caller owns them)."""
    fds = array.array("i")
    data = b""
    first = True
    while len(data) < 4 or len(data) < 4 + struct.unpack(">I", data[:4])[0]:
        size = CMSG_SPACE if first else 0
        chunk, ancillary, _flags, _addr = sock.recvmsg(65536, size)
        first = False
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        if not chunk:
            raise ConnectionError("client closed before its request was whole")
        data += chunk
        if len(data) >= 4 and struct.unpack(">I", data[:4])[0] > MAX_REQUEST_BYTES:
            raise ValueError("request too large")
    (length,) = struct.unpack(">I", data[:4])
    return json.loads(data[4 : 4 + length]), list(fds)


def send_event(sock: socket.socket, event: dict[str, int]) -> None:
    sock.sendall(json.dumps(event).encode() + b"\n")


# Interpreter flags the runtime accepts and ignores (they change nothing a warm child can
# still change: buffering, site handling, warnings, optimisation level).
_IGNORED_FLAGS = set("usEIBOqbdR")


def parse_command(argv: list[str]) -> tuple[str, str, list[str]] | None:
    """A Python command line (without the interpreter) as ``(kind, target, args)`` with
    kind ``"c"`` (code), ``"m"`` (module) or ``"path"`` (a script); ``None`` when the
    runtime cannot run it warm (interactive, stdin, an unknown flag): start it cold."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-c", "-m"):
            if i + 1 >= len(argv):
                return None
            return arg[1], argv[i + 1], argv[i + 2 :]
        if arg in ("-X", "-W"):
            i += 2
            continue
        if arg.startswith(("-X", "-W")):
            i += 1
            continue
        if arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= _IGNORED_FLAGS:
            i += 1
            continue
        if arg.startswith("-"):
            return None
        return "path", arg, argv[i + 1 :]
    return None
