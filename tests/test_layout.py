"""The package's layout: no import cycles inside cory/, and the zoo imports nothing above it.

Imports are read with `ast` from the source (imports inside functions included), so a cycle hidden
behind a function-level import is found too. Nothing is imported or loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORY = Path(__file__).resolve().parent.parent / "cory"

LAYERS = [
    ("errors", "corpora", "kl", "advantages", "losses", "algorithms", "config"),
    ("zoo",),
    ("policy", "lora", "sharding", "generation", "drift", "rollout"),
    ("rewards", "tasks"),
    ("envs",),
    ("agents",),
    ("metrics", "evaluate"),
    ("learner", "build", "run", "preflight", "train", "coevolve", "report"),
    ("api", "cli", "__main__"),
]
"""cory's layers, lowest first (docs/architecture.md describes them): a module imports from its own
layer or a lower one. Every top-level module or package of cory/ is in exactly one."""

ALLOWED_CYCLES: list[set[str]] = []
"""Cycles not removed yet (none)."""

ABOVE_THE_ZOO = ("cory.envs", "cory.agents", "cory.metrics", "cory.tasks", "cory.rewards", "cory.train", "cory.run",
                 "cory.build", "cory.preflight", "cory.api", "cory.cli", "cory.coevolve")
"""What the zoo (models, their recipes and build-time checks) must never import."""


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package (a package is its __init__)."""
    out = {}
    for path in CORY.rglob("*.py"):
        parts = list(path.relative_to(CORY.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The cory modules that module `name` imports anywhere in its source: `from a.b import c` is
    module a.b.c when that is a module, else a.b; relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected component of more than one module, as one cycle through it
    (a -> b -> ... -> a), found by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_through(c, graph) for c in components]


def _cycle_through(component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A path start -> ... -> start inside one strongly connected component (breadth first)."""
    start = min(component)
    previous = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def test_cycle_finder_reports_a_cycle_and_ignores_a_chain():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_import_reader_sees_imports_inside_functions_and_relative_ones(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from .kl import x\n\ndef f():\n    from cory.zoo import registry\n    import cory.envs.parsing\n")
    known = {"cory.learner": src, "cory.kl": src, "cory.zoo": src, "cory.zoo.registry": src, "cory.envs": src,
             "cory.envs.parsing": src}
    assert imports("cory.learner", src, known) == {"cory.kl", "cory.zoo.registry", "cory.envs.parsing"}


def test_no_import_cycles_inside_cory():
    found = [c for c in cycles(import_graph()) if set(c) not in ALLOWED_CYCLES]
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_zoo_imports_nothing_above_it():
    def above(target: str) -> bool:
        return any(target == layer or target.startswith(layer + ".") for layer in ABOVE_THE_ZOO)

    bad = [f"{name} imports {target}" for name, targets in sorted(import_graph().items())
           if name == "cory.zoo" or name.startswith("cory.zoo.") for target in sorted(targets) if above(target)]
    assert not bad, "; ".join(bad)


def layer_of(module: str) -> int | None:
    """The index in LAYERS of `cory.x` or `cory.x.y...` (None for the package root `cory`)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i
    raise AssertionError(f"{module} is in no layer: add cory.{parts[1]} to LAYERS here and to docs/architecture.md")


def test_every_import_points_to_its_own_layer_or_a_lower_one():
    bad = []
    for name, targets in sorted(import_graph().items()):
        for target in sorted(targets):
            if layer_of(name) is not None and layer_of(target) is not None and layer_of(target) > layer_of(name):
                bad.append(f"{name} (layer {layer_of(name) + 1}) imports {target} (layer {layer_of(target) + 1})")
    assert not bad, "; ".join(bad)
