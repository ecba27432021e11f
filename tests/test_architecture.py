"""The floors of ARCHITECTURE.md hold: no module imports from a floor above its own, and no import cycle.

Imports are read from the source (every ``import`` and ``from ... import`` of magpie_teach, at module level or
inside functions), so a late import counts like any other.
"""

import ast
import re

from tests.conftest import REPO

PACKAGE = REPO / "src" / "magpie_teach"


def floors_of_the_document() -> dict[str, int]:
    """Module prefix -> floor, read from ARCHITECTURE.md's table (``| N, name | `a.py`, `b/` | ... |``): the test
    checks what the document says, so the two cannot drift apart."""
    placed = {}
    for line in (REPO / "ARCHITECTURE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and re.match(r"\d+,", cells[0]):
            for name in re.findall(r"`([^`]+)`", cells[1]):
                placed[name.removesuffix(".py").rstrip("/")] = int(cells[0].split(",")[0])
    return placed


FLOORS = floors_of_the_document()


def floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]  # KeyError names a module ARCHITECTURE.md does not place


def modules() -> dict[str, set[str]]:
    """module (dotted, below magpie_teach) -> the magpie_teach modules it imports."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if name == "__init__" or name.endswith("__main__"):
            continue
        name = name.removesuffix(".__init__")
        graph[name] = imports_of(path.read_text())
    return graph


def imports_of(source: str) -> set[str]:
    """The magpie_teach modules SOURCE imports (dotted, below magpie_teach), wherever the import stands."""
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("magpie_teach"):
            base = node.module.removeprefix("magpie_teach").lstrip(".")
            for alias in node.names:  # `from magpie_teach.hub import cards` imports the module hub.cards
                sub = f"{base}.{alias.name}" if base else alias.name
                imported.add(sub if _is_module(sub) else base)
        elif isinstance(node, ast.Import):
            imported.update(
                a.name.removeprefix("magpie_teach.") for a in node.names if a.name.startswith("magpie_teach.")
            )
    return {m for m in imported if m and m != "__version__"}


def _is_module(dotted: str) -> bool:
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_the_document_places_the_floors_as_the_code_stands():
    assert FLOORS["errors"] == 0 and FLOORS["scoring"] == 1 and FLOORS["hub"] == 2 and FLOORS["cli"] == 4
    assert FLOORS["generation"] == FLOORS["evaluation"] == 3
    source = "from magpie_teach.hub import cards\nfrom magpie_teach import artefacts\nimport magpie_teach.data\n" \
             "def f():\n    from magpie_teach.scoring.metrics import car\n"  # fmt: skip
    assert imports_of(source) == {"hub.cards", "artefacts", "data", "scoring.metrics"}


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


def test_the_scoring_engine_imports_no_verb_and_every_verb_that_scores_calls_its_executor():
    """ARCHITECTURE.md: one executor, typed on the scoring run's settings, that never imports a verb; `rank`,
    `generate`'s scoring stage and `probe` score through it."""
    graph = modules()
    verbs = {"ranking.rank", "ranking.calibrate", "ranking.paradox", "cli"}
    assert not graph["scoring.executor"] & verbs, graph["scoring.executor"]
    for name, imported in graph.items():  # scoring/ writes no output folder: it imports none of the verbs
        if name.startswith("scoring"):
            assert not any(m.startswith(("ranking", "cli", "report")) for m in imported), (name, imported)
    assert not any(m.startswith(("generation", "evaluation", "steps", "hub")) for m in graph["scoring.executor"])
    for caller in ("ranking.rank", "generation.score_stage", "generation.probing"):
        assert "scoring.executor" in graph[caller], caller
