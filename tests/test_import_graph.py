"""The import graph of ``zoo/`` has no cycle.

Every module of ``zoo/`` is parsed with ``ast``; its module-level imports (those that run when it is imported:
top level, class bodies, ``try`` / ``if`` blocks, but not function bodies and not ``if TYPE_CHECKING:`` blocks) are
the edges. That graph must be acyclic. An import inside a function is lazy; where a lazy import of a ``zoo`` module
would close a cycle if it were moved to the top (the registry importing the model families that register into it),
it exists to break that cycle and must say so in a one-line comment containing "cycle" on or just above it.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted((REPO / "zoo").rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The ``zoo`` modules an import statement executes (``from a import b`` runs ``a`` and, if a module, ``a.b``)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            anchor = package[: len(package) - (node.level - 1)]
            base = ".".join(anchor + ([base] if base else []))
        names = [base, *(f"{base}.{a.name}" for a in node.names)]
    # A package's __init__ importing its own submodules through its name is not an edge to itself.
    return [n for n in names if n in MODULES and n != module]


def imports(module: str, lazy: bool) -> list[tuple[str, int]]:
    """``(target, line)`` of the module-level (``lazy=False``) or in-function (``lazy=True``) zoo imports."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []

    def visit(nodes: list[ast.stmt], in_function: bool) -> None:
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, True)
                continue
            if _is_type_checking(node):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)) and in_function == lazy:
                found.extend((t, node.lineno) for t in _targets(node, module, is_package))
            for block in ("body", "orelse", "finalbody"):
                visit(getattr(node, block, []), in_function)
            for handler in getattr(node, "handlers", []):
                visit(handler.body, in_function)

    visit(ast.parse(path.read_text(encoding="utf-8")).body, False)
    return found


GRAPH = {m: sorted({t for t, _ in imports(m, lazy=False)}) for m in MODULES}


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    stack = [start]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(GRAPH[node])
    return seen


def _find_cycle() -> list[str] | None:
    """One cycle of GRAPH as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in GRAPH[node]:
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for module in GRAPH:
        if module not in state and (cycle := dfs(module)):
            return cycle
    return None


def test_graph_is_read_from_the_sources():
    # The parser sees what it must: known top-level edges, and no edge from an import inside a function.
    assert "zoo.registry" in GRAPH["zoo.models.moe_llava"] and "zoo.moe" in GRAPH["zoo.models.dit"]
    assert "zoo.models" not in GRAPH["zoo.registry"]  # imported inside _ensure_registered
    assert ("zoo.models", imports("zoo.registry", lazy=True)[0][1]) in imports("zoo.registry", lazy=True)
    assert len(GRAPH) > 30


def test_zoo_import_graph_has_no_cycle():
    cycle = _find_cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lazy_imports_that_break_a_cycle_say_so():
    unnamed = []
    for module, path in MODULES.items():
        lines = path.read_text(encoding="utf-8").splitlines()
        for target, line in imports(module, lazy=True):
            if module not in _reachable(target):
                continue  # importing it at the top would make no cycle: lazy only to keep imports light
            context = lines[max(0, line - 3) : line]  # the import line and the two above it
            if not any("cycle" in text.split("#", 1)[-1] for text in context if "#" in text):
                unnamed.append(f"{path.relative_to(REPO)}:{line} imports {target}")
    assert not unnamed, "lazy imports that break an import cycle need a comment naming it: " + ", ".join(unnamed)
