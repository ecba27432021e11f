from pathlib import Path

import pandas as pd
import pytest

from magpie_teach.scoring.paradox import find_paradox_pairs, paradox_report, parse_size
from tests.conftest import SHARED_DATA

PACKAGED = Path(__file__).resolve().parents[1] / "src" / "magpie_teach" / "resources" / "paper_table6_performance.csv"


def table6() -> str:
    shared = SHARED_DATA / "paper_table6_performance.csv"
    return str(shared if shared.exists() else PACKAGED)


def test_packaged_copy_equals_the_shared_table():
    shared = SHARED_DATA / "paper_table6_performance.csv"
    assert shared.exists(), f"{shared} is missing: the checkout needs ../shared beside it (CI and sessions have it)"
    assert PACKAGED.read_text() == shared.read_text()
    assert PACKAGED.read_text().startswith("# Source: Table 6 of arXiv 2411.07133")


def test_sizes():
    assert parse_size("3.8B") == 3.8e9 and parse_size("2b") == 2e9 and parse_size("135M") == 135e6
    assert parse_size("-") is None and parse_size(7) == 7.0


def test_qwen2_7b_beats_72b_on_all_five_base_models():
    pairs = paradox_report(table6())
    hits = pairs[(pairs.smaller == "Qwen2-7B-Instruct") & (pairs.larger == "Qwen2-72B-Instruct")]
    assert sorted(hits.base_model) == sorted(
        ["Qwen2-1.5B", "Gemma-2-2B", "Qwen2.5-3B", "Llama-3.2-3B", "Llama-3.1-Minitron-4B"]
    )
    # reference computed here: AP = (AE2 LC + Arena-Hard) / 2, straight from the CSV
    raw = pd.read_csv(table6(), comment="#")
    raw["ap"] = (raw["AE2_LC_WR"] + raw["ArenaHard_WR"]) / 2
    for row in hits.itertuples():
        small = raw[(raw.base_model == row.base_model) & (raw.generator == row.smaller)]["ap"].item()
        large = raw[(raw.base_model == row.base_model) & (raw.generator == row.larger)]["ap"].item()
        assert row.ap_smaller == pytest.approx(small) and row.ap_larger == pytest.approx(large) and small > large


def test_every_listed_pair_is_a_real_paradox_and_none_is_missed():
    raw = pd.read_csv(table6(), comment="#")
    raw["ap"] = (raw["AE2_LC_WR"] + raw["ArenaHard_WR"]) / 2
    raw["params"] = raw["generator_size"].map(parse_size)
    expected = set()
    for (base, _family), group in raw.groupby(["base_model", "generator_family"]):
        for a in group.itertuples():
            for b in group.itertuples():
                if a.params < b.params and a.ap > b.ap:
                    expected.add((base, a.generator, b.generator))
    pairs = paradox_report(table6())
    assert set(zip(pairs.base_model, pairs.smaller, pairs.larger)) == expected
    assert len(expected) > 10


def test_families_table_overrides(tmp_path):
    perf = pd.DataFrame({"teacher": ["a", "b"], "base_model": ["x", "x"], "ap": [2.0, 1.0]})
    families = pd.DataFrame({"teacher": ["a", "b"], "family": ["f", "f"], "size": ["1B", "9B"]})
    pairs = find_paradox_pairs(perf, families)
    assert pairs[["smaller", "larger"]].values.tolist() == [["a", "b"]]
