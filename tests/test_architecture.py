"""The package's shape: no import cycle, private names stay inside their package, and
``config.py`` depends on nothing above it (issue 13).

Read statically from the sources (``ast``), so a cycle or a reach into another
package's private module fails here before it fails at import time somewhere else.
Only imports executed when a module is imported count toward cycles; an import inside a
function (a lazy import of an optional framework, say) does not.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "per_buffer"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _absolute(importer: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(name: str, *, top_level_only: bool) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for each import of a per_buffer module."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    nodes: list[ast.stmt] = []
    if top_level_only:
        for node in tree.body:
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` imports never run
                continue
            nodes.append(node)
    else:
        nodes = [node for node in ast.walk(tree) if isinstance(node, ast.stmt)]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("per_buffer"):
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            module = _absolute(name, path, node)
            if module.startswith("per_buffer"):
                found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def _target(module: str, imported: str) -> str:
    """The module an import binds: ``from pkg import sub`` may name a submodule."""
    candidate = f"{module}.{imported}"
    return candidate if candidate in MODULES else module


def test_there_is_no_import_cycle() -> None:
    graph = {
        name: {
            _target(module, imported)
            for module, names, _ in _imports(name, top_level_only=True)
            for imported in names or [""]
        }
        - {name}
        for name in MODULES
    }
    # a package's __init__ imports its modules: importing a module runs its parents'
    # __init__ first, which is not an edge back
    graph = {
        name: {t for t in targets if t in MODULES and not name.startswith(t + ".")}
        for name, targets in graph.items()
    }
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def _private_owner(dotted: str) -> str | None:
    """The package a private dotted name belongs to (``a.b._c.d`` -> ``a.b``), if any."""
    parts = dotted.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            return ".".join(parts[:index])
    return None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_reaches_into_another_packages_private_names(name: str) -> None:
    offending = []
    for module, names, line in _imports(name, top_level_only=False):
        for dotted in [module] + [f"{module}.{imported}" for imported in names]:
            owner = _private_owner(dotted)
            if owner is not None and name != owner and not name.startswith(owner + "."):
                offending.append(f"line {line}: {dotted}")
    assert offending == [], f"{name} imports private names of another package: {offending}"


def test_config_imports_nothing_above_it() -> None:
    allowed = {"per_buffer.errors", "per_buffer.models", "per_buffer._masking"}
    imported = {module for module, _, _ in _imports("per_buffer.config", top_level_only=False)}
    assert imported <= allowed, f"config.py imports {sorted(imported - allowed)}"
