"""The layers of ``src/virtman`` import in one direction only: no cycle between components.

A component is a subpackage of ``virtman`` (``virtman.nbd``, ``virtman.blockdev``, ...) or a
top-level module (``virtman.errors``). The graph is read from the source with ``ast``, so
imports inside functions and under ``TYPE_CHECKING`` count too: a lazy import that points
back up the layers is still an arrow pointing back up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import virtman

PACKAGE = Path(virtman.__file__).parent

#: Cycles tolerated between subpackages: none. A new one is a layering mistake to fix,
#: not an entry to add here.
KNOWN_CYCLES: frozenset[str] = frozenset()


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _component(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every virtman module named by an import statement anywhere in ``tree``."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            # ``from virtman import errors`` names a module, not an attribute.
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "virtman" or name.startswith("virtman.")}


def component_graph() -> dict[str, set[str]]:
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        source = _component(module)
        graph.setdefault(source, set())
        tree = ast.parse(path.read_text(), str(path))
        for name in _imported(tree, module, path.name == "__init__.py"):
            if name not in modules or name == "virtman":
                continue  # an attribute (``from virtman.x import Thing``) or the root
            target = _component(name)
            if target != source:
                graph[source].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of size > 1 are the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                members.append(top)
                if top == node:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _label(members: list[str]) -> str:
    return " <-> ".join(members)


def test_the_graph_sees_the_layers() -> None:
    # The reader must see real arrows, or "no cycle" would hold trivially.
    graph = component_graph()
    assert "virtman.nbd" in graph["virtman.blockdev"]  # RemoteDevice uses the NBD client
    assert "virtman.protocol" in graph["virtman.nbd"]
    assert "virtman.device" in graph["virtman.nbd"]


def test_a_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_no_import_cycles_between_components() -> None:
    cycles = {_label(members) for members in strongly_connected(component_graph())}
    known = {_label(sorted(label.split(" <-> "))) for label in KNOWN_CYCLES}
    assert cycles <= known, f"import cycles: {sorted(cycles - known)}"


def test_nbd_server_does_not_import_block_devices() -> None:
    graph = component_graph()
    assert "virtman.blockdev" not in graph["virtman.nbd"]
    assert "virtman.nbd" not in graph["virtman.protocol"]
