"""Install container images from ``requirements/lock.txt`` and prove that they did.

Decision 0005: every environment we ship is installed from the lock, never resolved afresh.
Standard library only (it runs in ``python:3.11-slim`` and in the vLLM base image before
anything is installed).

    python scripts/lock_check.py snapshot BASE.txt
        what is installed now (the base image), as name==version lines
    python scripts/lock_check.py constraints LOCK [--keep BASE.txt]
        pip constraints: the lock's pins; with --keep, every package of BASE pinned to the
        version the base image has (its engine stack must not change) and the lock's pins
        for the rest
    python scripts/lock_check.py verify LOCK [--baseline BASE.txt]
        fails, naming each, if an installed distribution is not the lock's version (or, with
        a baseline, if a base package changed, or a new one is not in the lock)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

# Never in the lock (pip freeze leaves them out): the installer and the project itself.
IGNORED = frozenset({"pip", "setuptools", "wheel", "hydraserve"})


def normalize(name: str) -> str:
    """PEP 503 name normalisation (``Typing_Extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(lines: Iterable[str]) -> dict[str, str]:
    """``name==version`` lines (comments and blanks skipped) as {normalised name: version}."""
    pins: dict[str, str] = {}
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not version.strip():
            raise ValueError(f"not an exact pin: {raw.strip()!r} (expected name==version)")
        pins[normalize(name.strip())] = version.strip()
    return pins


def installed() -> dict[str, str]:
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found[normalize(name)] = dist.version
    return found


def same_version(installed_version: str, pinned: str) -> bool:
    """PEP 440 ``==``: a pin without a local label also matches a local build
    (``2.13.0`` matches ``2.13.0+cpu``)."""
    if installed_version == pinned:
        return True
    return "+" not in pinned and installed_version.split("+", 1)[0] == pinned


def constraints(lock: Mapping[str, str], keep: Mapping[str, str] | None = None) -> list[str]:
    """pip constraint lines: ``keep``'s packages at their versions, the lock's for the rest."""
    keep = keep or {}
    out = [f"{name}=={version}" for name, version in sorted(keep.items()) if name not in IGNORED]
    out += [f"{name}=={version}" for name, version in sorted(lock.items()) if name not in keep]
    return out


def problems(
    lock: Mapping[str, str],
    now: Mapping[str, str],
    baseline: Mapping[str, str] | None = None,
) -> list[str]:
    """What makes the environment ``now`` not an install from ``lock`` (on ``baseline``)."""
    found: list[str] = []
    for name, version in sorted(now.items()):
        if name in IGNORED:
            continue
        if baseline is not None and name in baseline:
            if baseline[name] != version:
                found.append(
                    f"{name}: the base image has {baseline[name]}, the install changed it to "
                    f"{version} (a requirement of ours conflicts with the base image)"
                )
            continue
        pinned = lock.get(name)
        if pinned is None:
            found.append(f"{name}=={version} is installed but not in the lock")
        elif not same_version(version, pinned):
            found.append(f"{name}=={version} is installed, the lock pins {pinned}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    snap = sub.add_parser("snapshot")
    snap.add_argument("out", type=Path)
    cons = sub.add_parser("constraints")
    cons.add_argument("lock", type=Path)
    cons.add_argument("--keep", type=Path)
    ver = sub.add_parser("verify")
    ver.add_argument("lock", type=Path)
    ver.add_argument("--baseline", type=Path)
    args = parser.parse_args(argv)

    if args.command == "snapshot":
        lines = [f"{name}=={version}" for name, version in sorted(installed().items())]
        args.out.write_text("\n".join(lines) + "\n")
        return 0
    lock = read_pins(args.lock.read_text().splitlines())
    if args.command == "constraints":
        keep = read_pins(args.keep.read_text().splitlines()) if args.keep else None
        sys.stdout.write("\n".join(constraints(lock, keep)) + "\n")
        return 0
    baseline = read_pins(args.baseline.read_text().splitlines()) if args.baseline else None
    found = problems(lock, installed(), baseline)
    if found:
        sys.stderr.write(
            f"this environment is not an install from {args.lock}:\n  "
            + "\n  ".join(found)
            + "\nAdd the dependency to pyproject.toml and run `make lock`, or fix the pin.\n"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
