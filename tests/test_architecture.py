"""The package's layers, as docs/architecture.md draws them, checked on the source.

- No import cycle between the package's modules, counting imports inside functions too (an import moved
  into a function to dodge a cycle is still a cycle).
- Only `topology/` imports redis-py: the layers above speak in `Call`s.
- Features take the typed `Core`; none reaches into a private attribute of the backend or of the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "django_distcache"
NAME = "django_distcache"

# Tools that ship in the package but are not a layer of the cache: they may import redis-py.
REDIS_ALLOWED = {
    f"{NAME}.topology": "the layer that does the I/O",
    f"{NAME}.devcluster": "a development tool that starts and inspects local servers (make demo, tests)",
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports(module: str, path: Path) -> set[str]:
    """Every module `module` imports, at its top or inside a function (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path, node)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                targets.add(submodule if submodule in MODULES else base)
    return targets


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), plus modules importing themselves."""
    edges = {m: sorted(t for t in targets if t in MODULES and t != m) for m, targets in GRAPH.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    return found


def test_the_walk_sees_the_package():
    """The checks below mean something only if the walk finds the modules and their imports."""
    assert f"{NAME}.core" in MODULES and f"{NAME}.topology.cluster" in MODULES
    assert f"{NAME}.core" in GRAPH[f"{NAME}.cache"]
    assert "redis" in {target.split(".")[0] for target in GRAPH[f"{NAME}.topology"]}


def test_no_import_cycle_in_the_package():
    assert _cycles() == []


def test_a_cycle_would_be_found():
    """The cycle finder itself, on a graph with a known cycle."""
    saved = dict(GRAPH)
    try:
        GRAPH[f"{NAME}.keys"] = {*GRAPH[f"{NAME}.keys"], f"{NAME}.core"}
        assert any(f"{NAME}.keys" in cycle and f"{NAME}.core" in cycle for cycle in _cycles())
    finally:
        GRAPH.clear()
        GRAPH.update(saved)


def test_only_the_topology_imports_redis_py():
    offenders = {
        module: sorted(target for target in targets if target.split(".")[0] == "redis")
        for module, targets in GRAPH.items()
        if not any(module == allowed or module.startswith(allowed + ".") for allowed in REDIS_ALLOWED)
    }
    assert {module: found for module, found in offenders.items() if found} == {}


FEATURES = [module for module in MODULES if module not in (f"{NAME}.cache", f"{NAME}.core")]


@pytest.mark.parametrize("module", FEATURES)
def test_no_feature_reaches_into_the_backend_or_the_core(module):
    """`cache._x`, `core._x` and `backend._x` are private; a feature uses the core's public names."""
    tree = ast.parse(MODULES[module].read_text())
    reaches = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and isinstance(node.value, ast.Name | ast.Attribute)
        and (node.value.id if isinstance(node.value, ast.Name) else node.value.attr)
        in {"cache", "core", "backend"}
    ]
    untyped = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.arg)
        and node.arg in {"cache", "core"}
        and (node.annotation is None or ast.unparse(node.annotation) == "Any")
    ]
    assert reaches == [] and untyped == []
