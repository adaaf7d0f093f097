"""The package's import graph: no circle, and no stage importing a later one.

The graph is read from the source with ``ast`` (every ``import`` statement, deferred ones inside
functions included), so a circle cannot hide behind an import placed inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "weightdiff"

# Stages from first to last; a module may import its own stage or earlier ones only.
STAGES = [
    ("weightdiff.errors", "weightdiff.io", "weightdiff.outputs", "weightdiff.runtime"),
    ("weightdiff.kernels",),
    ("weightdiff.tasks",),
    ("weightdiff.base_networks",),
    ("weightdiff.targets",),
    ("weightdiff.weights", "weightdiff.zoo"),
    ("weightdiff.models",),
    ("weightdiff.training", "weightdiff.sampling", "weightdiff.evaluate"),
    ("weightdiff.demo",),
    ("weightdiff.commands",),
    ("weightdiff.cli", "weightdiff.__main__"),
]
# Inside a stage the arrows still point one way.
ALLOWED_SIDEWAYS = {
    ("weightdiff.io", "weightdiff.errors"),
    ("weightdiff.runtime", "weightdiff.errors"),
    ("weightdiff.outputs", "weightdiff.errors"),
    ("weightdiff.outputs", "weightdiff.io"),
    ("weightdiff.outputs", "weightdiff.runtime"),
    ("weightdiff.evaluate", "weightdiff.sampling"),
    ("weightdiff.training", "weightdiff.sampling"),
    ("weightdiff.__main__", "weightdiff.cli"),
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("weightdiff")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("weightdiff"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path, name) if m in files and m != name}
    return graph


def _stage(module: str) -> tuple[int, str]:
    for i, prefixes in enumerate(STAGES):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                return i, p
    raise AssertionError(f"module {module} belongs to no stage of the layering; add it to STAGES")


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_stage_imports_a_later_stage():
    bad = []
    for module, deps in _graph().items():
        if module == "weightdiff":
            continue
        (mi, mp) = _stage(module)
        for dep in deps:
            if dep == "weightdiff":
                continue
            (di, dp) = _stage(dep)
            if di > mi or (di == mi and dp != mp and (mp, dp) not in ALLOWED_SIDEWAYS):
                bad.append(f"{module} imports {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))
