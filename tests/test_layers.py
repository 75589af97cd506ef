"""Layering of kdforge's modules, read from the source with ``ast`` (nothing is imported).

The import graph has one edge per ``import kdforge...`` / ``from kdforge... import`` / relative
import anywhere in a module: at module level *and* inside functions, so an import moved into a
function to dodge a cycle still counts. ``from package import name`` is an edge to the submodule
``package.name`` when there is one, else to ``package``; the implicit import of a module's parent
packages is not an edge.

Rules: no import cycle, and a lower layer imports nothing from the layers above it (data flows down):
the engine nothing from the objectives or the recipes (the engine knows no objective); the tasks nothing
from the evaluation; the problem kinds (``kdforge.problems``, below both) nothing from either, nor from
the engine, models, objectives or recipes; the models nothing from the engine, evaluation, tasks,
objectives or recipes (the engine and the evaluation run models, not the other way round); the
objectives (loss math, CA-MKD's included) nothing from the recipes that assemble them, the evaluation or
the roles; the export code (``kdforge.deploy``) nothing from the engine, evaluation, tasks, objectives,
recipes or roles (the evaluation and the roles export, not the other way round); the file helpers
(``kdforge.io``) nothing from any of them.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

Graph = dict[str, dict[str, list[int]]]
"""module -> {imported module: line numbers of the imports}"""

BELOW = {
    "kdforge.engine": ("kdforge.objectives", "kdforge.recipes"),
    "kdforge.tasks": ("kdforge.evaluation",),
    "kdforge.problems": ("kdforge.tasks", "kdforge.evaluation", "kdforge.engine", "kdforge.models",
                         "kdforge.objectives", "kdforge.recipes"),
    "kdforge.models": ("kdforge.engine", "kdforge.evaluation", "kdforge.tasks", "kdforge.objectives",
                       "kdforge.recipes"),
    "kdforge.objectives": ("kdforge.recipes", "kdforge.evaluation", "kdforge.roles"),
    "kdforge.deploy": ("kdforge.engine", "kdforge.evaluation", "kdforge.tasks", "kdforge.objectives",
                       "kdforge.recipes", "kdforge.roles"),
    "kdforge.io": ("kdforge.engine", "kdforge.evaluation", "kdforge.tasks", "kdforge.models",
                   "kdforge.objectives", "kdforge.recipes", "kdforge.problems"),
}
"""package -> the packages above it, from which it imports nothing"""


def module_files(src: Path, package: str) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package ``__init__``) for every ``.py`` file of ``package``."""
    modules = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def import_graph(src: Path, package: str) -> Graph:
    """Edges from each module of ``package`` to the modules of ``package`` it imports (anywhere in the file)."""
    modules = module_files(src, package)

    def resolve(name: str) -> str | None:  # the module itself, else its closest enclosing package
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: Graph = {}
    for module, (path, is_package) in modules.items():
        here = module if is_package else module.rpartition(".")[0]
        edges: dict[str, list[int]] = {}
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(parent + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            else:
                continue
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                resolved = resolve(target)
                if resolved and resolved != module:
                    edges.setdefault(resolved, []).append(node.lineno)
        graph[module] = edges
    return graph


def find_cycles(graph: Graph, ignore: set[tuple[str, str]] = frozenset()) -> list[list[str]]:
    """One shortest cycle ``[a, b, ..., a]`` per strongly connected component of the graph (less ``ignore``)."""
    succ = {m: sorted(t for t in targets if (m, t) not in ignore and t in graph) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(succ):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:
        members, start = set(component), min(component)
        came_from: dict[str, str] = {}
        queue = deque([start])
        while queue:  # breadth-first back to start, inside the component
            v = queue.popleft()
            if start in succ[v]:
                path = [v]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                cycles.append([*reversed(path), start])
                break
            for w in succ[v]:
                if w in members and w not in came_from and w != start:
                    came_from[w] = v
                    queue.append(w)
    return sorted(cycles)


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(graph: Graph, package: str, above: tuple[str, ...]) -> list[tuple[str, str]]:
    """The edges from a module of ``package`` to a module of one of the packages ``above`` it."""
    return sorted((m, t) for m, targets in graph.items() if within(m, package)
                  for t in targets if any(within(t, a) for a in above))


def describe(cycle: list[str], graph: Graph) -> str:
    steps = [f"{a} -> {b} (line {', '.join(map(str, graph[a][b]))} of {a})"
             for a, b in zip(cycle, cycle[1:], strict=False)]
    return "\n    ".join(steps)


@pytest.fixture(scope="module")
def graph() -> Graph:
    return import_graph(SRC, "kdforge")


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The checker itself: relative, aliased and function-local imports are edges; a cycle made
    only through a function-local import is found; ``from pkg import sub`` is an edge to ``pkg.sub``."""
    files = {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg.b import x\nimport os\n",
        "pkg/b.py": "x = 1\n\n\ndef f():\n    from pkg import a\n    return a\n",
        "pkg/c.py": "from . import a\nfrom .b import x\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/d.py": "from ..c import a\nimport pkg.sub\nfrom pkg.b import f as g\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    g = import_graph(tmp_path, "pkg")
    assert g["pkg.a"] == {"pkg.b": [1]}
    assert g["pkg.b"] == {"pkg.a": [5]}
    assert g["pkg.c"] == {"pkg.a": [1], "pkg.b": [2]}
    assert g["pkg.sub.d"] == {"pkg.c": [1], "pkg.sub": [2], "pkg.b": [3]}
    assert find_cycles(g) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert find_cycles(g, ignore={("pkg.b", "pkg.a")}) == []
    assert upward_imports(g, "pkg.sub", ("pkg.c", "pkg.b")) == [("pkg.sub.d", "pkg.b"), ("pkg.sub.d", "pkg.c")]
    assert upward_imports(g, "pkg.c", ("pkg.sub",)) == []


def test_no_import_cycles(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import cycles (move the shared piece into a lower module):\n    " + "\n\n    ".join(
        describe(c, graph) for c in cycles)


@pytest.mark.parametrize("package", list(BELOW))
def test_a_lower_layer_imports_nothing_above_it(graph, package):
    """The engine knows no objective or recipe; tasks score models with their problem kind, not with
    evaluation/; the problem kinds sit below both; models/ sits below the engine and the evaluation;
    objectives/ below the recipes; deploy/ below the evaluation and the roles; kdforge.io below everything."""
    bad = upward_imports(graph, package, BELOW[package])
    assert not bad, f"{package} imports from {', '.join(BELOW[package])}: " + "; ".join(
        f"{m} -> {t} (line {', '.join(map(str, graph[m][t]))})" for m, t in bad)
