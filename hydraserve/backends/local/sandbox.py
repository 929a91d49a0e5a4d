"""A worker's view of its node's shared memory on this machine: only its own model,
read-only, and its instance's KV area, as the operator's per-model PersistentVolumeClaims
give it on Kubernetes (decision 0500).

``python -m hydraserve.backends.local.sandbox --hide DIR --ro DIR --rw DIR -- CMD...``
runs in a fresh mount namespace (``unshare --mount``): it opens the directories to keep,
covers ``--hide`` with an empty tmpfs, binds each kept directory back at its own path
(``--ro`` ones read-only) and execs ``CMD``. Nothing outside the kept directories of the
hidden tree can be opened from inside, and nothing changes for other processes. Needs
``CAP_SYS_ADMIN`` (root); :func:`sandbox_available` says whether this machine allows it.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from hydraserve.prefetcher.shm import ModelShm, kv_area_dir

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_CAPBSET_DROP = 24
CAP_SYS_ADMIN = 21


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    result = libc.mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


@cache
def sandbox_available() -> bool:
    """Whether workers can be given a private mount namespace here (root and unshare)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "true"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


def worker_view(
    shm_dir: Path, uri: str, revision: str, kv_area: str | None
) -> tuple[list[Path], list[Path]]:
    """What a worker of this model keeps of its node's shared memory: its model's
    directory (read-only) and, when it hands KV over, its instance's KV area."""
    read_only = [ModelShm(shm_dir, uri, revision).dir]
    read_write = [kv_area_dir(shm_dir, kv_area)] if kv_area is not None else []
    return read_only, read_write


def sandbox_prefix(hide: Path, read_only: Sequence[Path], read_write: Sequence[Path]) -> list[str]:
    """The command prefix that runs a worker with only these directories of ``hide``."""
    args = ["unshare", "--mount", "--propagation", "private", sys.executable, "-m", __name__]
    args += ["--hide", str(hide)]
    for path in read_only:
        args += ["--ro", str(path)]
    for path in read_write:
        args += ["--rw", str(path)]
    return [*args, "--"]


def enter(hide: Path, read_only: Sequence[Path], read_write: Sequence[Path]) -> None:
    """In a private mount namespace: cover ``hide``, then bind the kept directories back."""
    kept = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY), True) for p in read_only]
    kept += [(p, os.open(p, os.O_PATH | os.O_DIRECTORY), False) for p in read_write]
    _mount("tmpfs", str(hide), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    for path, fd, ro in kept:
        path.mkdir(parents=True, exist_ok=True)
        # The descriptor still names the directory under the tmpfs, which paths no longer do.
        _mount(f"/proc/self/fd/{fd}", str(path), None, MS_BIND, None)
        if ro:
            _mount("none", str(path), None, MS_BIND | MS_REMOUNT | MS_RDONLY, None)
        os.close(fd)
    # The cover itself read-only: nothing new can be created beside the kept directories.
    _mount("none", str(hide), None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
    # A worker running as root must not undo this (umount, remount rw): the command runs
    # without CAP_SYS_ADMIN, which root regains at exec only from the bounding set.
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_SYS_ADMIN, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"dropping CAP_SYS_ADMIN: {os.strerror(errno)}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hide", type=Path, required=True)
    parser.add_argument("--ro", type=Path, action="append", default=[])
    parser.add_argument("--rw", type=Path, action="append", default=[])
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    hide = args.hide.resolve()
    for path in [*args.ro, *args.rw]:
        if hide not in path.resolve().parents:
            parser.error(f"{path} is not inside {hide}")
    enter(hide, [p.resolve() for p in args.ro], [p.resolve() for p in args.rw])
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
