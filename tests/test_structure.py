"""The layout's promises, checked on the source: dependencies run one way (no import cycle, no core module importing
the embedded world, which registers itself like any plug-in) and train() stays a short recipe."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PLUGIN = "leapalign.shapeworld"


def _module(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the leapalign modules it imports anywhere (module level or inside functions)."""
    files = {_module(f): f for f in (SRC / "leapalign").rglob("*.py")}
    graph = {}
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" for a in node.names]
                deps |= {n for n in names if n in files} or {target}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("leapalign")}
        graph[mod] = {d for d in deps if d in files and d != mod}
    return graph


def test_no_import_cycle_among_the_modules():
    graph = import_graph()
    graph.pop("leapalign")  # the package root only registers the plug-in
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_core_modules_never_import_the_embedded_world():
    offenders = {m: sorted(d for d in deps if d.startswith(PLUGIN))
                 for m, deps in import_graph().items() if not m.startswith(PLUGIN) and m not in ("leapalign", "leapalign.cli")}
    assert not {m: d for m, d in offenders.items() if d}, offenders


def test_train_is_a_short_recipe_and_no_function_is_long():
    lengths = {}
    for f in (SRC / "leapalign").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths[f"{_module(f)}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert lengths["leapalign.train.train"] < 100
    assert {k: v for k, v in lengths.items() if v > 80} == {}
