"""Small modules, small functions: the handwritten code of kvmsandbox keeps a shape one can read.

- A module has at most ``MAX_MODULE_LINES`` lines (the generated ``*_pb2.py`` and ``*_pb2_grpc.py``
  are not counted).
- A function or method, nested ones included, has at most ``MAX_FUNCTION_LINES`` lines, counted from
  its ``def`` line through its last line (decorators not counted).

A function may be longer when its docstring says why, in a sentence that begins with the words
"Long because", e.g. "Long because it is the one table of every CRI field we map, kept in one place
so a reviewer sees them side by side." The reason is for the reader: splitting it would hide more
than it shows.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 60
EXEMPTION = "Long because"

FunctionNode = ast.FunctionDef | ast.AsyncFunctionDef


def handwritten_modules(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, FunctionNode]]:
    """Every function in ``tree`` with its qualified name (``Class.method``, ``outer.inner``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, FunctionNode):
            yield f"{prefix}{node.name}", node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def function_lines(node: FunctionNode) -> int:
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def long_modules(root: Path) -> list[str]:
    found = []
    for path in handwritten_modules(root):
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(root.parent)}: {lines} lines")
    return found


def long_functions(root: Path) -> list[str]:
    found = []
    for path in handwritten_modules(root):
        for name, node in functions(ast.parse(path.read_text(), filename=str(path))):
            lines = function_lines(node)
            if lines > MAX_FUNCTION_LINES and EXEMPTION not in (ast.get_docstring(node) or ""):
                found.append(f"{path.relative_to(root.parent)}:{node.lineno} {name}: {lines} lines")
    return found


def test_every_module_has_at_most_450_lines() -> None:
    found = long_modules(REPO / "kvmsandbox")
    assert not found, f"{len(found)} module(s) over {MAX_MODULE_LINES} lines:\n" + "\n".join(found)


def test_every_function_has_at_most_60_lines_or_says_why_it_is_long() -> None:
    found = long_functions(REPO / "kvmsandbox")
    assert not found, (
        f"{len(found)} function(s) over {MAX_FUNCTION_LINES} lines without a docstring saying "
        f"{EXEMPTION!r} ...:\n" + "\n".join(found)
    )


# -- the checker itself, on a small tree --


def body(lines: int) -> str:
    return "".join(f"    x{i} = {i}\n" for i in range(lines))


def test_the_checker_counts_def_through_last_line_and_honours_the_exemption(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "shapes.py").write_text(
        "def fits():\n"
        + body(59)
        + "\n\nclass Holder:\n    def too_long(self):\n"
        + body(60).replace("    ", "        ")
        + "\n\ndef explained():\n"
        + '    """Builds the table. Long because every row sits in one place."""\n'
        + body(70)
    )
    (root / "big.py").write_text("x = 1\n" * 451)
    (root / "api_pb2.py").write_text("x = 1\n" * 1000)

    assert long_functions(root) == ["pkg/shapes.py:64 Holder.too_long: 61 lines"]
    assert long_modules(root) == ["pkg/big.py: 451 lines"]
