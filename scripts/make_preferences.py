"""Writes src/magpie_teach/resources/preferences.jsonl, the preference pairs the demo's reward model is
trained on: for each instruction of the shipped sample, each written response is preferred over a
refusal, over the answer to another instruction, and over its own first few words.

    python scripts/make_preferences.py
"""

import json
import random
from pathlib import Path

RESOURCES = Path(__file__).resolve().parents[1] / "src" / "magpie_teach" / "resources"
REFUSALS = ["I'm sorry, I can't help with that.", "I don't know.", "Please ask someone else.", "No."]


def main() -> None:
    rows = [json.loads(line) for line in (RESOURCES / "sample_responses.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    by_instruction: dict[str, list[str]] = {}
    for row in rows:
        by_instruction.setdefault(row["instruction"], []).append(row["response"])
    instructions = sorted(by_instruction)
    pairs = []
    for i, instruction in enumerate(instructions):
        other = by_instruction[instructions[(i + 1 + rng.randrange(len(instructions) - 1)) % len(instructions)]][0]
        for response in by_instruction[instruction]:
            words = response.split()
            for rejected, kind in ((rng.choice(REFUSALS), "refusal"), (other, "off_topic"),
                                   (" ".join(words[: max(2, len(words) // 5)]), "truncated")):  # fmt: skip
                pairs.append({"instruction": instruction, "chosen": response, "rejected": rejected, "kind": kind})
    rng.shuffle(pairs)
    with open(RESOURCES / "preferences.jsonl", "w") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair) + "\n")
    print(f"wrote {len(pairs)} pairs")


if __name__ == "__main__":
    main()
