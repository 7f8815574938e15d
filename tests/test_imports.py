"""The import graph of `nas/`: no cycles, counting imports inside functions too (a cycle
there works until someone moves an import to the top), and `import nas` stays light."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

NAS = Path(__file__).resolve().parents[1] / "nas"


def module_names() -> dict[str, bool]:
    """Every module of nas/ by dotted name -> whether it is a package (__init__.py)."""
    names = {}
    for path in NAS.rglob("*.py"):
        parts = list(path.relative_to(NAS.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        names[".".join(parts[:-1] if package else parts)] = package
    return names


def imported(name: str, package: bool, tree: ast.AST, modules) -> set[str]:
    """The nas modules that module `name` imports anywhere in its source: `from nas.x import
    y` counts nas.x.y where y is a module, else nas.x; relative imports resolved. Importing
    nas.x.y runs nas/x/__init__.py too: that package counts as imported, unless the importer
    lies inside it (a package's own modules import their package implicitly, and a package
    importing its modules is the usual pattern, not a cycle)."""
    here = name.split(".") if package else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([base] if base else []))
            targets.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names)
    out = set()
    for target in targets:
        parts = target.split(".")
        for i in range(len(parts), 0, -1):  # the module, then the packages it lies in
            prefix = ".".join(parts[:i])
            if prefix in modules and not (name == prefix or name.startswith(prefix + ".")):
                out.add(prefix)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imported(name, package, ast.parse((NAS.parent / (
        name.replace(".", "/") + ("/__init__.py" if package else ".py"))).read_text()), modules)
        for name, package in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_every_kind_of_import():
    modules = {"nas": True, "nas.a": True, "nas.a.b": False, "nas.a.c": False, "nas.d": False}
    source = ("from . import c\n"              # relative, a module: nas.a.c
              "def f():\n"
              "    from nas.d import thing\n"  # inside a function, a name of nas.d
              "    import nas.a.c\n")
    assert imported("nas.a.b", False, ast.parse(source), modules) == {"nas.a.c", "nas.d"}
    # nas.d importing nas.a.b runs nas/a/__init__.py too; nas.a.b importing its own package
    # does not count.
    assert imported("nas.d", False, ast.parse("from nas.a.b import x\n"),
                    modules) == {"nas.a", "nas.a.b"}
    assert imported("nas.a.b", False, ast.parse("from nas.a import c\nimport nas.a\n"),
                    modules) == {"nas.a.c"}
    assert imported("nas.a", True, ast.parse("from .b import x\n"), modules) == {"nas.a.b"}


def test_find_cycle_names_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"b"}}) == ["b", "c", "b"]


def test_no_import_cycle_in_nas():
    graph = import_graph()
    assert {"nas.cost.latency", "nas.kernels.conv", "nas.cmd.train"} <= set(graph)
    assert "nas.cost.tables" in graph["nas.cost.latency"]  # the graph has the edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_nothing_of_cost():
    """Dependencies point one way: cost models may use the kernels, never the reverse."""
    graph = import_graph()
    wrong = {f"{name} -> {target}" for name, targets in graph.items()
             if name.startswith("nas.kernels") for target in targets
             if target.startswith("nas.cost")}
    assert not wrong


def test_only_commands_import_commands():
    """Library code lives outside nas/cmd/: only the commands and the CLI import them."""
    graph = import_graph()
    wrong = {f"{name} -> {target}" for name, targets in graph.items()
             if not name.startswith("nas.cmd") and name != "nas.cli" for target in targets
             if target.startswith("nas.cmd")}
    assert not wrong


# nas.bench.estimate compares estimates with the committed tables: no GPU, no torch.
@pytest.mark.parametrize("module", ["nas", "nas.bench.estimate"])
def test_light_modules_import_no_heavy_dependency(module):
    heavy = ("torch", "ray", "optuna", "onnx", "onnxruntime", "matplotlib", "triton")
    code = (f"import sys, {module}\n"
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == ""
