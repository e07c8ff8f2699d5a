"""The package's layout: its layers (each module imports only from its own layer or below), no
import cycles inside cory/, imports at the top of each module, and no private name imported from
another module.

Imports are read with `ast` from the source (imports inside functions included), so a cycle or an
upward arrow hidden behind a function-level import is found too. Nothing is imported or loaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

CORY = Path(__file__).resolve().parent.parent / "cory"

LAYERS = [
    ("errors", "paths", "jsonl", "corpora", "kl", "advantages", "losses", "shaping", "algorithms"),
    ("envs",),
    ("zoo",),
    ("attention", "trunk", "generation", "policy", "scoring", "drift", "lora", "sharding", "optim"),
    ("rollout",),
    ("rewards",),
    ("tasks", "teacher_student"),
    ("agents",),
    ("metrics", "evaluate"),
    ("config",),
    ("preflight", "learner", "build", "run", "rollout_worker"),
    ("train", "coevolve", "report"),
    ("api", "cli", "__main__"),
]
"""cory's layers, lowest first (docs/architecture.md describes them): a module imports from its own
layer or a lower one. Every top-level module or package of cory/ is in exactly one. The text
environments sit below the zoo (the agent models pretrain on their transcripts); the one that
talks to a student model (`teacher_student`) sits above the models and rewards it loads."""

OPTIONAL = ("vllm", "bitsandbytes", "trl", "deepspeed", "datasets")
"""Optional dependencies: imported where they are used, so that cory runs without them."""


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
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


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


def function_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import inside a function or method of the file at `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import):
                    found += [(sub.lineno, a.name) for a in sub.names]
                elif isinstance(sub, ast.ImportFrom):
                    found.append((sub.lineno, "." * sub.level + (sub.module or "")))
    return found


def test_function_imports_are_found(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\n\nclass A:\n    def f(self):\n        import vllm.lora\n        from . import x\n")
    assert function_imports(src) == [(5, "vllm.lora"), (6, ".")]


def test_imports_sit_at_the_top_of_each_module_but_optional_ones():
    """A function-level import hides a dependency (and once hid an import cycle); only the optional
    dependencies, which cory must run without, are imported where they are used."""
    bad = [f"{path.relative_to(CORY.parent)}:{line} imports {module}" for path in sorted(modules().values())
           for line, module in function_imports(path) if module.split(".")[0] not in OPTIONAL]
    assert not bad, "; ".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = []
    for name, path in sorted(modules().items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cory"):
                bad += [f"{name} imports {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    assert not bad, "; ".join(bad)
