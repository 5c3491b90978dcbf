"""The package's dependency rule (README, "Architecture"): which folder may import which, no import circles, no
hidden imports inside functions, no function a reader cannot hold. Parsed with `ast`, nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sleep_trl"

# Each unit's layer: a module may import modules of its own unit or of lower layers only. Units on one layer are
# independent of each other. The README's architecture section shows the same table.
LAYERS = {
    "_version": 0, "paper": 0, "io": 0, "errors": 0,
    "tiny": 1,
    "assets": 2,
    "rewards": 3, "memory": 3, "data": 3, "generation": 3,
    "eval": 4,
    "dreaming": 5,
    "trainers": 6,
    "sleep": 7,
    "scripts": 8,
    "cli": 9,
    "__main__": 10, "__init__": 10,
}
MAX_FUNCTION_LINES = 80


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield path, parts


def unit_of(parts) -> str:
    return parts[0] if parts else "__init__"


def imports(path: Path, parts) -> list[tuple[str, bool, int]]:
    """(imported sleep_trl module path, inside a function?, line) for every package-internal import."""
    tree = ast.parse(path.read_text())
    package = parts[:-1]  # the package a relative import starts from (for `x/__init__.py` too: `x`)
    out = []
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(x) for f in functions for x in ast.walk(f)}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - node.level + 1])
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] if node.module else [f"{'.'.join(base)}.{a.name}".strip(".") for a in node.names]
            elif node.module and (node.module == "sleep_trl" or node.module.startswith("sleep_trl.")):
                targets = [node.module.removeprefix("sleep_trl").lstrip(".")]
        elif isinstance(node, ast.Import):
            targets = [a.name.removeprefix("sleep_trl").lstrip(".") for a in node.names
                       if a.name == "sleep_trl" or a.name.startswith("sleep_trl.")]
        for target in targets:
            out.append((target, id(node) in inside, node.lineno))
    return out


def test_no_upward_or_sideways_import():
    bad = []
    for path, parts in modules():
        unit = unit_of(parts)
        assert unit in LAYERS, f"{path}: unit {unit!r} has no layer; add it to LAYERS and to the README"
        for target, _, line in imports(path, parts):
            dest = target.split(".")[0] or "__init__"
            if dest == unit:
                continue
            if LAYERS.get(dest, 99) >= LAYERS[unit]:
                bad.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({unit}, layer {LAYERS[unit]}) imports "
                           f"{dest} (layer {LAYERS.get(dest)})")
    assert not bad, "imports against the dependency rule:\n" + "\n".join(bad)


def test_no_import_circle_between_modules():
    graph: dict[str, set[str]] = {}
    names = {".".join(parts) for _, parts in modules()}
    for path, parts in modules():
        if parts[-1] == "__init__":
            continue
        own = ".".join(parts)
        graph[own] = set()
        for target, _, _ in imports(path, parts):
            if target in names and not target.endswith("__init__") and target != own:
                graph[own].add(target)
    seen, stack, cycles = {}, [], []

    def visit(node):
        seen[node] = 1
        stack.append(node)
        for nxt in graph.get(node, ()):
            if seen.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif not seen.get(nxt):
                visit(nxt)
        stack.pop()
        seen[node] = 2

    for node in graph:
        if not seen.get(node):
            visit(node)
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_package_import_hidden_inside_a_function():
    hidden = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
              for path, parts in modules() for target, inside, line in imports(path, parts) if inside]
    assert not hidden, "package-internal imports inside functions (hoist them to the module top):\n" + "\n".join(hidden)


def test_no_function_longer_than_a_reader_can_hold():
    long = []
    for path, _ in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({length} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(long)


@pytest.mark.parametrize("source, unit", [("from ..trainers import X", "memory"), ("from sleep_trl.sleep import Y", "eval")])
def test_the_rule_catches_an_upward_import(tmp_path, source, unit):
    """The checker itself: an upward import in a module of a low layer is found."""
    path = tmp_path / "probe.py"
    path.write_text(source + "\n")
    targets = [t.split(".")[0] for t, _, _ in imports(path, (unit, "probe"))]
    assert targets and all(LAYERS[t] > LAYERS[unit] for t in targets)
