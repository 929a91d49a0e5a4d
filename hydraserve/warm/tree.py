"""Which processes belong to a worker when some of them were forked by a warm runtime
(they are the runtime's children, not the worker's): each runtime leaves a note per child
naming the process it was forked for."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path


def _parents() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            stat = (entry / "stat").read_text()
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2 :].split()[1])
    return parents


def record_child(children_dir: Path, child: int, requester: int) -> None:
    children_dir.mkdir(parents=True, exist_ok=True)
    (children_dir / str(child)).write_text(str(requester))


def forget_child(children_dir: Path, child: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        (children_dir / str(child)).unlink()


def process_tree(roots: Iterable[int], children_dirs: Iterable[Path] = ()) -> list[int]:
    """``roots`` and every live process started on their behalf, directly or through a
    warm runtime whose notes are in ``children_dirs``."""
    below: dict[int, list[int]] = defaultdict(list)
    for pid, parent in _parents().items():
        below[parent].append(pid)
    for directory in children_dirs:
        with contextlib.suppress(FileNotFoundError):
            for note in directory.iterdir():
                with contextlib.suppress(OSError, ValueError):
                    below[int(note.read_text())].append(int(note.name))
    seen: list[int] = []
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen or not Path(f"/proc/{pid}").exists():
            continue
        seen.append(pid)
        stack += below.get(pid, [])
    return seen
