"""Counts of `make mutation`'s results per module (killed, survived, no tests, timeout), from mutmut's
``mutants/**/*.py.meta`` files; the survivors themselves are what ``mutmut results`` printed above
(``mutmut show NAME`` gives a survivor's diff)."""

import json
import sys
from collections import Counter
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}  # fmt: skip


def main() -> int:
    metas = sorted(Path("mutants").rglob("*.py.meta"))
    if not metas:
        print("no mutmut results under mutants/ (run `make mutation`)", file=sys.stderr)
        return 1
    total: Counter = Counter()
    for meta in metas:
        codes = json.loads(meta.read_text()).get("exit_code_by_key", {})
        counts = Counter(STATUS.get(code, "suspicious") for code in codes.values())
        total.update(counts)
        name = str(meta.relative_to("mutants")).removesuffix(".meta")
        print(f"{name}: {len(codes)} mutants, " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    checked = sum(total.values()) - total["not checked"]
    score = total["killed"] / checked if checked else 0.0
    print(f"all: {sum(total.values())} mutants, " + ", ".join(f"{k} {v}" for k, v in sorted(total.items()))
          + f"; killed {score:.0%} of those checked")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
