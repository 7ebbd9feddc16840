"""The package's layers: no module imports from a layer above it, and no import cycle."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import lledit

SOURCE = Path(lledit.__file__).parent

LAYERS = (
    ("lledit.data",),
    ("lledit.tokens", "lledit.layers", "lledit.progress", "lledit.checks", "lledit.moments"),
    ("lledit.model",),
    ("lledit.edit", "lledit.memory", "lledit.footprint"),
    ("lledit.stats",),
    ("lledit.locate",),
    ("lledit.eval",),
    ("lledit.hypernet",),
    ("lledit.methods",),
    ("lledit.journal",),
    ("lledit.export",),
    ("lledit.server",),
    ("lledit.cli", "lledit.__main__"),
)
"""Lowest first. The package itself (`lledit/__init__.py`) is the front door above them all."""


def _modules() -> dict[str, Path]:
    modules = {}
    for path in SOURCE.rglob("*.py"):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported lledit module, line, at module level) for every import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            # `from lledit import progress` imports the module lledit.progress.
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target == "lledit" or target.startswith("lledit."):
                found.append((target, node.lineno, id(node) in top_level))
    return found


def _layer(module: str) -> int:
    for rank, members in enumerate(LAYERS):
        if any(module == m or module.startswith(m + ".") for m in members):
            return rank
    return len(LAYERS)


def test_every_module_has_a_layer():
    unplaced = [name for name in _modules() if name != "lledit" and _layer(name) == len(LAYERS)]
    assert unplaced == [], f"add these modules to LAYERS: {unplaced}"


@functools.cache
def _import_table() -> dict[str, list[tuple[str, int, bool]]]:
    """Every module's `lledit` imports, read once for all the checks below."""
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def test_no_module_imports_from_a_layer_above_it():
    upward = [
        f"{name}:{line} imports {target}"
        for name, imports in _import_table().items()
        if name != "lledit"
        for target, line, _ in imports
        if _layer(target) > _layer(name)
    ]
    assert upward == []


def test_imports_of_lledit_are_at_module_level():
    deferred = [
        f"{name}:{line} imports {target} inside a function"
        for name, imports in _import_table().items()
        for target, line, top in imports
        if not top
    ]
    assert deferred == []


def test_methods_do_not_import_each_other():
    crossing = [
        f"{name} imports {target}"
        for name, imports in _import_table().items()
        if name.startswith("lledit.methods.")
        for target, _, _ in imports
        if target.startswith("lledit.methods")
    ]
    assert crossing == []


def test_no_import_cycle():
    table = _import_table()
    graph = {
        name: {target for target, _, _ in imports if target in table}
        for name, imports in table.items()
    }
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                return [*trail, name, target]
            if target not in state and (cycle := visit(target, [*trail, name])):
                return cycle
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state:
            cycle = visit(name, [])
            assert cycle is None, " -> ".join(cycle)


def test_the_checks_see_a_violation(tmp_path):
    """The walk finds an upward import and a deferred one when they are there."""
    path = tmp_path / "probe.py"
    path.write_text("from lledit.cli import app\n\ndef f():\n    from lledit import progress\n")
    found = _imports("lledit.tokens", path, set(_modules()))
    assert ("lledit.cli", 1, True) in found
    assert ("lledit.progress", 4, False) in found
    assert _layer("lledit.cli") > _layer("lledit.tokens")
