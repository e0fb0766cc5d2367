"""The house by floors: no import circle in the library (lazy imports included), modules of a readable size,
and `import crepa_mem` without torch."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "crepa_mem"
# Old module paths kept as one-line re-exports for users (README names them); they sit above what they re-export.
SHIMS = {"crepa_mem.simpletuner", "crepa_mem.adapters"}
MAX_LINES = 420


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path) -> set[str]:
    """Every crepa_mem module this file imports, at module level or inside functions (not TYPE_CHECKING)."""
    name = module_name(path)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_only(node):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("crepa_mem"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("crepa_mem"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in files.items():
        # importing a.b.c means importing a and a.b too; only edges to real modules count
        targets = {t for t in imports_of(path) if t in files and t != name}
        edges[name] = targets - {"crepa_mem"}  # the lazy public API sits above everything
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_no_import_circle_in_the_library():
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " → ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


FLOORS = {  # a module may import its own floor or lower ones
    "crepa_mem.integrations": 4, "crepa_mem.doctor": 4, "crepa_mem.planning": 4,
    "crepa_mem.regularizer": 3, "crepa_mem.teacher": 2, "crepa_mem.trace": 3, "crepa_mem.testing": 3,
}


def floor(name: str) -> int:
    if name in SHIMS:
        return 5
    for prefix, level in FLOORS.items():
        if name == prefix or name.startswith(prefix + "."):
            return level
    return 1  # config, errors, units, loss, capture, profiles


@pytest.mark.parametrize("name", sorted(graph()))
def test_floors_read_top_down(name):
    upward = [t for t in graph()[name] if floor(t) > floor(name)]
    assert not upward, f"{name} (floor {floor(name)}) imports from above: {upward}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def test_import_crepa_mem_imports_no_torch():
    code = "import sys, crepa_mem, crepa_mem.planning.planner, crepa_mem.doctor.diagnose; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
