"""No module of kvmsandbox imports itself, directly or through others.

Every ``import``/``from ... import`` statement counts, wherever it is: at the top, inside a function,
under ``if TYPE_CHECKING:`` (a cycle the type checker has to untangle is still a cycle). ``from p
import name`` is an edge to ``p.name`` when that is a module of the tree, else to ``p``; relative
imports are resolved. Importing ``p.q`` is an edge to ``p.q`` only: the package ``p`` that Python
initialises on the way is not an explicit import.
"""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# An edge (importer, imported) and where it is written, as "path:line".
Graph = dict[str, dict[str, list[str]]]


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` by dotted name (a package by its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules of the tree that one import statement in ``module`` names explicitly."""
    top = module.split(".")[0]
    if isinstance(node, ast.Import):
        return [closest_module(alias.name, known) for alias in node.names if in_tree(alias.name, top)]
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, node.module] if node.module else package)
    else:
        base = node.module or ""
    if not in_tree(base, top):
        return []
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else closest_module(base, known)
        for alias in node.names
    ]


def in_tree(name: str, top: str) -> bool:
    return name == top or name.startswith(top + ".")


def closest_module(name: str, known: set[str]) -> str:
    """``name`` itself, or its longest prefix that is a module (an import of something the tree lacks
    still loads the packages above it)."""
    parts = name.split(".")
    while ".".join(parts) not in known and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def import_graph(root: Path) -> Graph:
    """Which module of the package at ``root`` imports which, with where each import is written."""
    modules = module_names(root)
    known = set(modules)
    graph: Graph = defaultdict(lambda: defaultdict(list))
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in imported_modules(node, module, path.name == "__init__.py", known):
                where = f"{path.relative_to(root.parent)}:{node.lineno}"
                if target != module and where not in graph[module][target]:
                    graph[module][target].append(where)
    return graph


def strongly_connected(graph: Graph) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, {})):
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
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def cycles(graph: Graph, limit: int = 50) -> list[list[str]]:
    """The elementary cycles of the graph, each starting at its smallest module and closed by
    repeating it; at most ``limit`` per strongly connected component."""
    return [cycle for component in strongly_connected(graph) for cycle in component_cycles(graph, component, limit)]


def component_cycles(graph: Graph, component: list[str], limit: int) -> list[list[str]]:
    found: list[list[str]] = []

    def walk(path: list[str], allowed: set[str]) -> None:
        for succ in sorted(graph[path[-1]]):
            if len(found) >= limit:
                return
            if succ == path[0]:
                found.append([*path, succ])
            elif succ in allowed and succ not in path:
                walk([*path, succ], allowed)

    for start in component:
        walk([start], {m for m in component if m > start})
    return found


def describe(cycle: list[str], graph: Graph) -> str:
    lines = [" -> ".join(cycle)]
    for a, b in itertools.pairwise(cycle):
        lines.append(f"    {a} -> {b}: {', '.join(graph[a][b])}")
    return "\n".join(lines)


def test_kvmsandbox_has_no_import_cycle() -> None:
    graph = import_graph(REPO / "kvmsandbox")
    assert graph, "no import found: the module walk is broken"
    found = cycles(graph)
    assert not found, f"{len(found)} import cycle(s):\n" + "\n".join(describe(c, graph) for c in found)


# -- the checker itself, on small trees --


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/a.py": "from pkg.b import helper\n",
            "pkg/b.py": "def helper() -> None:\n    from pkg import a\n",
        },
    )

    graph = import_graph(root)

    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert describe(["pkg.a", "pkg.b", "pkg.a"], graph).splitlines() == [
        "pkg.a -> pkg.b -> pkg.a",
        "    pkg.a -> pkg.b: pkg/a.py:1",
        "    pkg.b -> pkg.a: pkg/b.py:2",
    ]


def test_relative_and_type_checking_imports_make_cycles_too(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/sub/__init__.py": "from .inner import thing\n",
            "pkg/sub/inner.py": (
                "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from ..top import T\n\nthing = 1\n"
            ),
            "pkg/top.py": "from .sub import thing\nT = int\n",
        },
    )

    assert cycles(import_graph(root)) == [["pkg.sub", "pkg.sub.inner", "pkg.top", "pkg.sub"]]


def test_a_clean_tree_passes_and_parent_packages_are_not_implied(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            # The package re-exports a submodule's name; the submodule imports a sibling, not the package.
            "pkg/__init__.py": "from pkg.x.y import value\n",
            "pkg/x/__init__.py": "",
            "pkg/x/y.py": "import os\nimport pkg.z\nvalue = pkg.z.VALUE\n",
            "pkg/z.py": "VALUE = 1\n",
        },
    )

    graph = import_graph(root)

    assert {a: sorted(b) for a, b in graph.items()} == {"pkg": ["pkg.x.y"], "pkg.x.y": ["pkg.z"]}
    assert cycles(graph) == []
