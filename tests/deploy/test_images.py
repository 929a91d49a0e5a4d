"""Container images install from the lock (decision 0005), and the lock covers pyproject.

No Docker engine runs here, so the Dockerfiles are read, and the script their builds run
(``scripts/lock_check.py``) is tested on its own: it is what makes a build fail when an
image would contain a version the lock does not pin.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements" / "lock.txt"
DOCKERFILES = ("operator/Dockerfile", "worker/Dockerfile")


def load_lock_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock_check", ROOT / "scripts" / "lock_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lock_check = load_lock_check()


def run_commands(dockerfile: str) -> list[list[str]]:
    """The shell commands of every RUN instruction (continuations joined, split on &&)."""
    text = (ROOT / dockerfile).read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        if line.startswith("RUN "):
            for part in line.removeprefix("RUN ").split("&&"):
                words = shlex.split(part)
                commands.append(words[: words.index(">")] if ">" in words else words)
    return commands


def is_pip_install(command: list[str]) -> bool:
    pip = command[0] == "pip" or command[0].endswith("/pip")
    return (pip and command[1:2] == ["install"]) or command[1:4] == ["-m", "pip", "install"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_every_pip_install_in_an_image_is_constrained_and_then_verified(dockerfile: str) -> None:
    commands = run_commands(dockerfile)
    installs = [i for i, c in enumerate(commands) if is_pip_install(c)]
    assert installs, f"{dockerfile} installs nothing?"
    for i in installs:
        assert "--constraint" in commands[i], f"{dockerfile}: unconstrained {commands[i]}"
    verify = [i for i, c in enumerate(commands) if c[1:3] == ["scripts/lock_check.py", "verify"]]
    assert verify and verify[-1] > installs[-1], f"{dockerfile}: no verify after the install"
    assert commands[verify[-1]][3] == "requirements/lock.txt"
    copies = (ROOT / dockerfile).read_text()
    assert "COPY requirements/lock.txt" in copies and "COPY scripts/lock_check.py" in copies
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not {"requirements", "scripts", "requirements/lock.txt"} & set(ignored)


def test_the_operator_image_pins_everything_to_the_lock() -> None:
    commands = run_commands("operator/Dockerfile")
    (install,) = [c for c in commands if is_pip_install(c)]
    assert install[install.index("--constraint") + 1] == "requirements/lock.txt"
    assert ".[operator]" in install  # the control plane: no engine, no torch


def test_the_worker_image_keeps_its_base_and_adds_only_locked_packages() -> None:
    commands = run_commands("worker/Dockerfile")
    steps = [" ".join(c) for c in commands]
    snapshot = steps.index("python3 scripts/lock_check.py snapshot /tmp/base.txt")
    constraints = steps.index(
        "python3 scripts/lock_check.py constraints requirements/lock.txt --keep /tmp/base.txt"
    )
    install = next(i for i, s in enumerate(steps) if "pip install" in s)
    assert "--constraint /tmp/constraints.txt" in steps[install] and ".[gpu]" in steps[install]
    verify = steps.index(
        "python3 scripts/lock_check.py verify requirements/lock.txt --baseline /tmp/base.txt"
    )
    assert snapshot < constraints < install < verify


def test_the_worker_base_image_satisfies_the_gpu_extra() -> None:
    text = (ROOT / "worker" / "Dockerfile").read_text()
    (tag,) = re.findall(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v([\w.]+)$", text, re.MULTILINE)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    (vllm,) = [Requirement(r) for r in extras["gpu"] if Requirement(r).name == "vllm"]
    assert Version(tag) in vllm.specifier, f"vllm {tag} in the image, pyproject says {vllm}"


def test_the_lock_pins_every_declared_dependency_at_an_allowed_version() -> None:
    """What pyproject declares (core, cpu, operator, dev: what `make lock` installs) is in the
    lock at a version its specifier allows: a dependency added without `make lock` fails."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in ("cpu", "operator", "dev"):
        declared += project["optional-dependencies"][extra]
    pins = lock_check.read_pins(LOCK.read_text().splitlines())
    problems = []
    for raw in declared:
        requirement = Requirement(raw)
        pinned = pins.get(canonicalize_name(requirement.name))
        if pinned is None:
            problems.append(f"{requirement.name} is not in the lock")
        elif not requirement.specifier.contains(Version(pinned), prereleases=True):
            problems.append(f"{requirement} but the lock pins {pinned}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)


def test_lock_pins_are_exact() -> None:
    with pytest.raises(ValueError, match="not an exact pin"):
        lock_check.read_pins(["numpy>=2"])
    pins = lock_check.read_pins(["# a comment", "", "Typing_Extensions==4.16.0  # why"])
    assert pins == {"typing-extensions": "4.16.0"}
    assert lock_check.read_pins(LOCK.read_text().splitlines())  # the real lock parses


def test_constraints_keep_the_base_image_and_take_the_rest_from_the_lock() -> None:
    lock = {"pydantic": "2.14.3", "structlog": "26.1.0", "torch": "2.13.0+cpu"}
    base = {"pydantic": "2.10.6", "torch": "2.9.0+cu128", "pip": "24.0"}
    assert lock_check.constraints(lock, base) == [
        "pydantic==2.10.6",
        "torch==2.9.0+cu128",
        "structlog==26.1.0",
    ]
    assert lock_check.constraints(lock) == [
        "pydantic==2.14.3",
        "structlog==26.1.0",
        "torch==2.13.0+cpu",
    ]


def test_verify_names_what_is_not_an_install_from_the_lock() -> None:
    lock = {"pydantic": "2.14.3", "structlog": "26.1.0", "torch": "2.13.0"}
    clean = {"pydantic": "2.14.3", "torch": "2.13.0+cpu", "pip": "24.0", "hydraserve": "0.1.0"}
    assert lock_check.problems(lock, clean) == []
    found = lock_check.problems(lock, {"pydantic": "2.15.0", "rogue": "1.0"})
    assert found == [
        "pydantic==2.15.0 is installed, the lock pins 2.14.3",
        "rogue==1.0 is installed but not in the lock",
    ]
    base = {"pydantic": "2.10.6", "vllm": "0.33.0"}
    layered = {"pydantic": "2.10.6", "vllm": "0.33.1", "structlog": "26.1.0", "extra": "1"}
    found = lock_check.problems(lock, layered, base)
    assert found[0].startswith("extra==1 is installed but not in the lock")
    assert "vllm: the base image has 0.33.0, the install changed it to 0.33.1" in found[1]
    assert len(found) == 2
