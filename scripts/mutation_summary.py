"""`make mutation`'s report, from mutmut's ``mutants/`` folder: counts per module (killed, survived, no tests,
timeout), then every survivor as the line it changes, except those reviewed in ``scripts/mutation_reviewed.yaml``
(counted by reason: equivalent mutants, and the gaps left open on purpose).

A reviewed entry names the function and the line before and after the mutation, not mutmut's number (which
shifts when the function changes): an entry whose line is edited stops matching, and the survivor is listed
again for a new review. ``--write-unreviewed FILE`` writes the unreviewed survivors in that file's format, each
with an empty ``why`` to fill in."""

import argparse
import ast
import difflib
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import yaml

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}  # fmt: skip
REVIEWED = Path(__file__).with_name("mutation_reviewed.yaml")


def _functions(source: Path) -> dict[str, str]:
    """Every function of a mutated module by name (mutmut's ``x_NAME__mutmut_orig`` / ``..._N``), as its text."""
    text = source.read_text()
    lines = text.splitlines()
    return {node.name: "\n".join(lines[node.lineno - 1 : node.end_lineno])
            for node in ast.walk(ast.parse(text)) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}  # fmt: skip


def _change(functions: dict[str, str], mutant: str) -> tuple[str, str, str]:
    """(function, the original lines, the mutated lines) of ``mutant`` (``module.x_func__mutmut_N``), stripped."""
    name = mutant.rsplit(".", 1)[-1]
    base = name.rsplit("__mutmut_", 1)[0]
    original = functions.get(f"{base}__mutmut_orig", "").replace(f"{base}__mutmut_orig(", "F(", 1).splitlines()
    mutated = functions.get(name, "").replace(f"{name}(", "F(", 1).splitlines()
    old, new = [], []
    for line in difflib.unified_diff(original, mutated, lineterm="", n=0):
        if line.startswith("-") and not line.startswith("---"):
            old.append(line[1:].strip())
        elif line.startswith("+") and not line.startswith("+++"):
            new.append(line[1:].strip())
    return mutant.rsplit("__mutmut_", 1)[0], "\n".join(old), "\n".join(new)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-unreviewed", metavar="FILE", help="write the unreviewed survivors here (YAML)")
    parser.add_argument("--prune", action="store_true",
                        help="remove the reviewed entries that match no survivor (killed since, or lines edited)")  # fmt: skip
    args = parser.parse_args()
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/ (run `make mutation`)", file=sys.stderr)
        return 1
    reviewed = {(e["function"], e["old"].strip(), e["new"].strip()): e["why"]
                for e in yaml.safe_load(REVIEWED.read_text()) or []}  # fmt: skip
    total: Counter = Counter()
    by_reason: Counter = Counter()
    unreviewed: dict[str, list] = defaultdict(list)
    matched: set = set()
    complete: set = set()
    for meta in metas:
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        counts = Counter(STATUS.get(code, "suspicious") for code in codes.values())
        total.update(counts)
        name = str(meta.relative_to("mutants")).removesuffix(".meta")
        if codes and not counts["not checked"]:  # a module run whole: its reviewed entries can be judged stale
            complete.add(name.removeprefix("src/").removesuffix(".py").replace("/", ".") + ".")
        print(f"{name}: {len(codes)} mutants, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
        survivors = sorted(m for m, code in codes.items() if STATUS.get(code) in ("survived", "no tests"))
        if survivors:
            functions = _functions(meta.with_suffix(""))
            for mutant in survivors:
                change = _change(functions, mutant)
                if change in reviewed:
                    by_reason[reviewed[change]] += 1
                    matched.add(change)
                else:
                    unreviewed[name].append((mutant, *change))
    checked = sum(total.values()) - total["not checked"]
    score = total["killed"] / checked if checked else 0.0
    print(f"all: {sum(total.values())} mutants, " + ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
          + f"; killed {score:.0%} of those checked")  # fmt: skip
    n_reviewed = sum(by_reason.values())
    n_open_gaps = sum(n for reason, n in by_reason.items() if reason.startswith("NOT equivalent"))
    print(
        f"\nsurvivors reviewed ({REVIEWED.name}): {n_reviewed}, of which equivalent {n_reviewed - n_open_gaps}, "
        f"not pinned by a test yet {n_open_gaps}"
    )
    for reason, n in by_reason.most_common():
        print(f"  {n:4d}  {reason}")
    n_open = sum(len(v) for v in unreviewed.values())
    print(f"\nsurvivors not reviewed: {n_open}")
    for items in unreviewed.values():
        for mutant, _, old, new in items:
            print(
                f"  {mutant}\n    - {old.replace(chr(10), chr(10) + '    - ')}\n    + {new.replace(chr(10), chr(10) + '    + ')}"
            )
    stale = [e for e in reviewed if e not in matched and e[0].startswith(tuple(complete))]
    if stale and not args.prune:
        print(f"\nreviewed entries matching no survivor: {len(stale)} (killed since, or their line edited; --prune)")
    if args.prune and stale:
        kept = [e for e in yaml.safe_load(REVIEWED.read_text())
                if (e["function"], e["old"].strip(), e["new"].strip()) not in stale]  # fmt: skip
        header = "".join(line for line in REVIEWED.read_text().splitlines(keepends=True) if line.startswith("#"))
        REVIEWED.write_text(header + yaml.safe_dump(kept, sort_keys=False, allow_unicode=True, width=200))
        print(f"\n{len(stale)} entries matching no survivor removed from {REVIEWED.name}")
    if args.write_unreviewed:
        entries = [{"function": function, "old": old, "new": new, "why": ""}
                   for items in unreviewed.values() for _, function, old, new in items]  # fmt: skip
        Path(args.write_unreviewed).write_text(yaml.safe_dump(entries, sort_keys=False, allow_unicode=True, width=200))
    return 0


if __name__ == "__main__":
    sys.exit(main())
