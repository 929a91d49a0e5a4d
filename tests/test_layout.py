"""The layout keeps the promises the architecture page makes about it.

Read statically (with ``ast``; nothing is imported): no package of ``hydraserve`` imports,
directly or through others, a package that imports it; no runtime module imports test doubles
(``tests``), the benchmarks, or the emulated network-namespace cluster outside the places that
offer it as an option; the wheel holds the runtime packages only; and every package directory
is named on ``docs/architecture.md``'s map, so the map cannot drift from the tree.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from setuptools import find_namespace_packages, find_packages

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hydraserve"
ROOT = "hydraserve"

# Who may import the emulated cluster (network namespaces, shaped links): it is an option of
# the embedded platform and its command line, and a tool of the benchmarks (not a package of
# `hydraserve`), never part of a backend or of the gateway.
EMULATION = "hydraserve.emulation"
EMULATION_USERS = frozenset({EMULATION, "hydraserve.platform", "hydraserve.cli"})
# Top-level names the runtime must never import: test doubles and measurement scripts.
NOT_RUNTIME = ("tests", "conftest", "benchmarks")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. hydraserve.gateway.app
    path: Path
    line: int
    target: str  # the imported module, absolute, e.g. hydraserve.backends.base

    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line} imports {self.target}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    """Whether ``name`` (under ``hydraserve``) is a module or package of the tree."""
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or base.is_dir()


def imports_of(path: Path) -> Iterator[Import]:
    """Every import in ``path``, wherever it appears (module level, functions, and
    ``TYPE_CHECKING`` blocks alike: a type-only import is still a dependency)."""
    module = module_name(path)
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, path, node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            for alias in node.names:
                child = f"{source}.{alias.name}"
                # `from hydraserve import logs` imports the module hydraserve.logs;
                # `from hydraserve.store import ModelRef` imports hydraserve.store.
                target = child if source.startswith(ROOT) and is_module(child) else source
                yield Import(module, path, node.lineno, target)


def runtime_imports() -> list[Import]:
    return [imp for path in sorted(PACKAGE.rglob("*.py")) for imp in imports_of(path)]


def unit(module: str) -> str:
    """The package (or top-level module) of ``hydraserve`` that ``module`` belongs to."""
    return ".".join(module.split(".")[:2])


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` with more than one member."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_graph(imports: list[Import]) -> dict[tuple[str, str], list[Import]]:
    edges: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports:
        if not in_package(imp.target, ROOT):
            continue
        source, target = unit(imp.module), unit(imp.target)
        if source != target:
            edges[source, target].append(imp)
    return edges


def describe_cycles(edges: dict[tuple[str, str], list[Import]]) -> list[str]:
    graph: dict[str, set[str]] = defaultdict(set)
    for source, target in edges:
        graph[source].add(target)
    problems = []
    for component in strongly_connected(graph):
        members = set(component)
        witnesses = [
            f"  {imps[0].where()}"
            for (source, target), imps in sorted(edges.items())
            if source in members and target in members
        ]
        problems.append(" <-> ".join(component) + "\n" + "\n".join(witnesses))
    return problems


def test_no_import_cycle_between_packages() -> None:
    problems = describe_cycles(package_graph(runtime_imports()))
    assert not problems, (
        "packages of hydraserve that import each other (directly or through others); move the "
        "shared code down into the package both may import:\n" + "\n".join(problems)
    )


def test_the_cycle_check_finds_a_cycle_through_a_third_package() -> None:
    """The check itself: a -> b -> c -> a is reported with one witness per edge, d is not."""

    def imp(source: str, target: str) -> Import:
        return Import(source, REPO / "x.py", 1, target)

    edges = package_graph(
        [
            imp("hydraserve.a.m", "hydraserve.b.n"),
            imp("hydraserve.b.n", "hydraserve.c"),
            imp("hydraserve.c.o", "hydraserve.a.p"),
            imp("hydraserve.d", "hydraserve.a"),
            imp("hydraserve.a.m", "hydraserve.a.q"),  # inside a package: not an edge
        ]
    )
    problems = describe_cycles(edges)
    assert len(problems) == 1
    assert problems[0].startswith("hydraserve.a <-> hydraserve.b <-> hydraserve.c\n")
    assert problems[0].count("imports") == 3


def test_relative_and_from_imports_resolve_to_modules() -> None:
    """``imports_of`` sees what Python would import: relative imports resolve against the
    importing package, and ``from package import module`` names the module."""
    found = {
        (imp.module, imp.target)
        for imp in runtime_imports()
        if imp.module in {"hydraserve.cli.main", "hydraserve.gateway.app"}
    }
    assert ("hydraserve.gateway.app", "hydraserve.backends.base") in found
    assert all(not target.startswith(".") for _, target in found)


def test_runtime_does_not_import_test_doubles_or_benchmarks() -> None:
    offending = [
        imp.where()
        for imp in runtime_imports()
        if any(in_package(imp.target, name) for name in NOT_RUNTIME)
    ]
    assert not offending, (
        "runtime code must not import test doubles or benchmarks (they are not in the wheel "
        "or the images); move what it needs into hydraserve:\n" + "\n".join(offending)
    )


def test_emulated_cluster_is_imported_only_where_it_is_an_option() -> None:
    offending = [
        imp.where()
        for imp in runtime_imports()
        if in_package(imp.target, EMULATION) and unit(imp.module) not in EMULATION_USERS
    ]
    assert not offending, (
        f"{EMULATION} (network namespaces) is an option of the embedded platform and its CLI "
        f"({sorted(EMULATION_USERS)}), not part of the control plane:\n" + "\n".join(offending)
    )


def package_dirs() -> list[str]:
    """Every directory of ``hydraserve`` that holds Python code, as a dotted name."""
    return sorted(
        module_name(path.parent / "__init__.py")
        for path in PACKAGE.rglob("*.py")
        if "__pycache__" not in path.parts
    )


def test_wheel_holds_the_runtime_packages_and_nothing_else() -> None:
    """What ``[tool.setuptools.packages.find]`` puts in the wheel (and so in the images):
    every package of ``hydraserve`` (the namespace ones too) and no test doubles."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    finder = find_namespace_packages if find.get("namespaces", True) else find_packages
    packaged = set(
        finder(
            where=str(REPO / find.get("where", ["."])[0]),
            include=find.get("include", ["*"]),
            exclude=find.get("exclude", []),
        )
    )
    outside = sorted(p for p in packaged if not in_package(p, ROOT))
    assert not outside, f"the wheel would ship {outside}; restrict packages.find to hydraserve*"
    missing = sorted(set(package_dirs()) - packaged)
    assert not missing, f"packages left out of the wheel: {missing}"


@pytest.mark.parametrize("dockerfile", ["operator/Dockerfile", "worker/Dockerfile"])
def test_images_do_not_copy_the_tests(dockerfile: str) -> None:
    text = (REPO / dockerfile).read_text()
    copies = [line for line in text.splitlines() if re.match(r"\s*(COPY|ADD)\b", line)]
    assert copies, f"{dockerfile} copies nothing?"
    assert not [line for line in copies if re.search(r"\btests\b|\bbenchmarks\b|\s\.\s", line)]
    assert "tests" in (REPO / ".dockerignore").read_text().split()


def architecture_table() -> tuple[set[str], str]:
    """The names in the first column of docs/architecture.md's packages table, and the
    table's text."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Packages", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    names = {name for row in rows for name in re.findall(r"`([\w.]+)`", row.split("|")[1])}
    return names, "\n".join(rows)


def test_every_package_is_on_the_architecture_map() -> None:
    """Each package of ``hydraserve`` (and each top-level module) has a row in the map;
    each nested package (``backends/local``) is named in its parent's row; the table names
    nothing that is gone."""
    named, table = architecture_table()
    top_level = {p.split(".")[1] for p in package_dirs() if p != ROOT} | {
        path.name for path in PACKAGE.glob("*.py") if path.name != "__init__.py"
    }
    missing = sorted(name for name in top_level if name not in named)
    assert not missing, (
        f"docs/architecture.md's packages table has no row for {missing}: add one (what it "
        "is, what decides, what acts)"
    )
    nested = ["/".join(p.split(".")[1:]) for p in package_dirs() if p.count(".") > 1]
    unnamed = [name for name in nested if f"`{name}" not in table]
    assert not unnamed, f"docs/architecture.md's packages table does not name {unnamed}"
    stale = sorted(name for name in named - top_level)
    assert not stale, f"docs/architecture.md's packages table names what no longer exists: {stale}"
