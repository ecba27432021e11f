"""The floors of ARCHITECTURE.md hold: no module imports from a floor above its own, and no import cycle.

Imports are read from the source (every ``import`` and ``from ... import`` of magpie_teach, at module level or
inside functions), so a late import counts like any other.
"""

import ast

from tests.conftest import REPO

PACKAGE = REPO / "src" / "magpie_teach"
FLOORS = [  # module prefixes per floor, ground first (ARCHITECTURE.md's table)
    ("errors", "settings", "processes", "progress"),
    ("artefacts", "batch_store", "config", "chat", "data", "modeling", "scoring", "selection", "tables", "tiny"),
    ("steps", "hub", "review", "training", "report"),
    ("generation", "evaluation"),
    ("demo", "cli"),
]


def floor(module: str) -> int:
    head = module.split(".")[0]
    return next(i for i, names in enumerate(FLOORS) if head in names)


def modules() -> dict[str, set[str]]:
    """module (dotted, below magpie_teach) -> the magpie_teach modules it imports."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name == "__init__" or name.endswith("__main__"):
            continue
        name = name.removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("magpie_teach"):
                base = node.module.removeprefix("magpie_teach").lstrip(".")
                if base:
                    imported.add(base)
                else:  # from magpie_teach import artefacts
                    imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                imported.update(
                    a.name.removeprefix("magpie_teach.") for a in node.names if a.name.startswith("magpie_teach.")
                )
        graph[name] = {m for m in imported if m and m != "__version__"}
    return graph


def test_every_module_has_a_floor():
    for name in modules():
        floor(name)  # StopIteration names a module ARCHITECTURE.md does not place


def test_no_import_points_up_a_floor():
    upward = [
        f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})"
        for name, targets in modules().items()
        for target in targets
        if floor(target) > floor(name)
    ]
    assert not upward, upward


def test_no_import_cycle():
    graph = modules()

    def resolve(target: str) -> str | None:  # a module, or the package whose __init__ it is
        while target and target not in graph:
            target = target.rpartition(".")[0]
        return target or None

    edges = {name: {r for t in targets if (r := resolve(t)) and r != name} for name, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
