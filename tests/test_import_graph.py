"""The package's import graph has no cycles between its modules and subpackages.

Built from the source with ``ast`` (every import, at module level or inside a function, but not
those under ``if TYPE_CHECKING:``, which never run), collapsed to ``deploy_prune.X``: a
subpackage's own files may import each other (registries register on import), but across
modules dependencies go one way, as the layers in the design do.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "deploy_prune"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(name: str) -> str:
    return ".".join(name.split(".")[:2])


def _imports(path: Path) -> set[str]:
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            t = node.test
            if (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"):
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)

    Visitor().visit(ast.parse(path.read_text()))
    return {n for n in found if n.startswith("deploy_prune.")}


def import_graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        unit = _unit(name)
        graph.setdefault(unit, set())
        for dep in _imports(path):
            # "from deploy_prune.x import name" names a module or an attribute: keep the module
            while dep not in modules and "." in dep:
                dep = dep.rsplit(".", 1)[0]
            if dep in modules and _unit(dep) != unit:
                graph[unit].add(_unit(dep))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one unit (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    found = cycles(graph)
    detail = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{a} -> {sorted(graph[a] & set(c))}" for a in c) + ")" for c in found)
    assert not found, f"import cycles: {detail}"


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_methods_never_import_the_pipeline() -> None:
    graph = import_graph()
    assert "deploy_prune.pipeline" not in graph["deploy_prune.methods"]
    assert "deploy_prune.agent" not in graph["deploy_prune.latency"]  # the measurer and the agent depend one way
    assert "deploy_prune.backends" not in graph["deploy_prune.config"]  # parsing a target asks no backend
