"""vledge's internal import graph, read from the source with ast (nothing is imported)."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name prefix -> folder, as pyproject.toml's package-dir maps them
PACKAGES = {"vledge.export": ROOT / "export", "vledge.runtime": ROOT / "runtime", "vledge": ROOT / "vledge"}


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    deferred: bool  # inside a function (runs when called) rather than at import time
    type_only: bool  # under ``if TYPE_CHECKING:``


def module_files() -> dict[str, Path]:
    files = {}
    for prefix, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = [p for p in relative.parts if p != "__init__"]
            name = ".".join([prefix, *parts]) if parts else prefix
            if prefix == "vledge" and parts and parts[0] in ("export", "runtime"):
                continue
            files[name] = path
    return files


def _resolve(name: str, modules: set[str]) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def edges(include_external: bool = False) -> list[Edge]:
    files = module_files()
    modules = set(files)
    found = []
    for source, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        package = source if path.name == "__init__.py" else source.rpartition(".")[0]
        _walk(tree, source, package, modules, found, deferred=False, type_only=False, external=include_external)
    return found


def _walk(node, source, package, modules, found, deferred, type_only, external) -> None:
    for child in ast.iter_child_nodes(node):
        child_deferred = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        child_type_only = type_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
        if isinstance(child, ast.Import):
            for alias in child.names:
                _add(alias.name, source, child.lineno, modules, found, deferred, type_only, external)
        elif isinstance(child, ast.ImportFrom):
            base = child.module or ""
            if child.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - child.level + 1] + ([base] if base else []))
            for alias in child.names:
                target = f"{base}.{alias.name}"
                if _resolve(target, modules) == target:  # ``from package import module``
                    _add(target, source, child.lineno, modules, found, deferred, type_only, external)
                else:
                    _add(base, source, child.lineno, modules, found, deferred, type_only, external)
        _walk(child, source, package, modules, found, child_deferred, child_type_only, external)


def _add(name, source, line, modules, found, deferred, type_only, external) -> None:
    target = _resolve(name, modules)
    if target is None and external:
        target = name
    if target is not None and target != source:
        found.append(Edge(source, target, line, deferred, type_only))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    import sys

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def graph_of(found: list[Edge], deferred: bool = True) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for edge in found:
        if edge.type_only or (edge.deferred and not deferred):
            continue
        graph.setdefault(edge.source, set()).add(edge.target)
    return graph
