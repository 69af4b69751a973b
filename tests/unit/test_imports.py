"""The rooms' import graph: no circles, lazy imports included, and every arrow pointing the allowed way."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import parse_module

ROOT = Path(__file__).resolve().parents[2]
ROOMS = ("workers", "lib")
# What runs on a Vast instance: the worker, the consumer beside it, and what both use.
ON_INSTANCE = (
    "workers.null.worker",
    "workers.null.instance",
    "workers.null.consumer",
    "workers.null.queues",
    "workers.null.protocol",
    "workers.null.aio",
    "workers.null.cli",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for room in ROOMS for path in sorted((ROOT / room).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its body (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(parse_module(path)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            # ``from package import module`` imports the module; ``from module import name`` the module.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target in known and target != name}
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def within(name: str, rooms: tuple[str, ...]) -> bool:
    return any(name == room or name.startswith(room + ".") for room in rooms)


def test_the_graph_sees_lazy_and_relative_imports():
    """The checker itself: an import inside a function and ``from package import module`` both count."""
    edges = graph()
    assert "lib.demo.run" in edges["lib.demo.cli"]  # imported inside main()
    assert "workers.null.dispatch.sdk" in edges["workers.null.dispatch.dispatcher"]  # from ... import sdk
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_itself_back_through_others():
    """No import circle among the project's modules, counting imports made lazily inside functions."""
    assert cycles(graph()) == []


def test_nothing_under_workers_imports_lib_or_the_tests():
    """An instance has only requirements.txt and workers/: no module there imports lib or tests, even lazily."""
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if name.startswith("workers.")
        for target in targets
        if not target.startswith("workers.")
    ]
    assert wrong == []


def test_what_runs_on_an_instance_never_imports_the_users_side():
    """The worker, the consumer and the queues never import the dispatcher's room or the session client."""
    wrong = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        if within(name, ON_INSTANCE)
        for target in targets
        if not within(target, ON_INSTANCE)
    ]
    assert wrong == []
