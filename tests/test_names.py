"""Names that match across real spellings: the Generator-Zoo's columns and the Hub ids of the paper's base models
against the shipped Table 6, before anything is scored."""

import pandas as pd
import pytest

from magpie_teach.errors import ConfigError
from magpie_teach.scoring.metrics import correlations, load_performance
from magpie_teach.scoring.names import key, load_aliases, match_names, normalise
from tests.conftest import REPO

TABLE6 = REPO / "src" / "magpie_teach" / "resources" / "paper_table6_performance.csv"
# the 19 generator columns of Magpie-Align/Magpie-100K-Generator-Zoo, spelt as their Hub repos are
ZOO_COLUMNS = [
    "Qwen2-1.5B-Instruct", "Qwen2-7B-Instruct", "Qwen2-72B-Instruct",
    "Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct", "Qwen2.5-14B-Instruct", "Qwen2.5-32B-Instruct", "Qwen2.5-72B-Instruct",
    "Meta-Llama-3-8B-Instruct", "Meta-Llama-3-70B-Instruct",
    "Meta-Llama-3.1-8B-Instruct", "Meta-Llama-3.1-70B-Instruct", "Meta-Llama-3.1-405B-Instruct",
    "gemma-2-2b-it", "gemma-2-9b-it", "gemma-2-27b-it",
    "Phi-3-mini-128k-instruct", "Phi-3-small-128k-instruct", "Phi-3-medium-128k-instruct",
]  # fmt: skip
PAPER_BASES = ["Qwen/Qwen2-1.5B", "google/gemma-2-2b", "Qwen/Qwen2.5-3B", "meta-llama/Llama-3.2-3B",
               "nvidia/Llama-3.1-Minitron-4B-Width-Base"]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("meta-llama/Meta-Llama-3.1-70B-Instruct", "llama-3.1-70b-instruct"),
        ("nvidia/Llama-3.1-Minitron-4B-Width-Base", "llama-3.1-minitron-4b"),
        ("google/gemma-2-2b", "gemma-2-2b"),
        ("Qwen2.5-7B-Instruct-AWQ", "qwen2.5-7b-instruct"),
        ("/models/local/Qwen2_1.5B/", "qwen2-1.5b"),
        ("Base", "base"),
        ("-Base", "-base"),  # a suffix alone is a name, not nothing
        ("models/Model-X/", "model-x"),
        ("Gemma 2 9b it", "gemma-2-9b-it"),
        ("tiny-llama-s@sha256:0123456789ab", "tiny-llama-s"),  # a local model as `push` publishes its name
    ],
)
def test_names_normalise_by_the_documented_rules(name, expected):
    assert normalise(name) == expected


def test_the_zoo_and_the_papers_hub_ids_match_all_19_teachers_of_table_6_for_every_base_model():
    performance = load_performance(str(TABLE6))
    matches = match_names(ZOO_COLUMNS, PAPER_BASES, performance)
    table = performance.groupby("base_model")["teacher"].apply(set)
    for match in matches:
        assert len(match.matched) == 19 and not match.unmatched, match.line()
        assert match.line().endswith("in the table: 19 teacher(s) matched")  # nothing unmatched to name
        assert set(match.matched.values()) == table[match.table_name]  # one table row per Zoo column
    assert [m.table_name for m in matches] == ["Qwen2-1.5B", "Gemma-2-2B", "Qwen2.5-3B", "Llama-3.2-3B",
                                               "Llama-3.1-Minitron-4B"]  # fmt: skip


def test_a_base_model_matching_nothing_and_too_few_teachers_are_errors_naming_the_keys():
    performance = load_performance(str(TABLE6))
    with pytest.raises(
        ConfigError, match="^--performance: base model 'google/gemma-7b' \\(key 'gemma-7b'\\) matches no"
    ):
        match_names(ZOO_COLUMNS, ["google/gemma-7b"], performance)
    with pytest.raises(ConfigError, match="only 2 teacher\\(s\\) have performance numbers.*my-teacher"):
        match_names(["gemma-2-9b-it", "Qwen2-7B-Instruct", "my-teacher"], ["Qwen/Qwen2-1.5B"], performance)


def test_each_base_model_is_matched_against_its_own_rows_of_the_table():
    performance = pd.DataFrame({"teacher": ["t1", "t2", "t3", "u1", "u2", "u3"], "base_model": ["A"] * 3 + ["B"] * 3,
                                "ap": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]})  # fmt: skip
    (a,) = match_names(["org/t1", "t2", "T3", "u1"], ["hub/a"], performance)
    assert a.base_model == "hub/a" and a.table_name == "A" and a.unmatched == ["u1"]
    assert a.matched == {"org/t1": "t1", "t2": "t2", "T3": "t3"}
    assert a.line() == "hub/a = 'A' in the table: 3 teacher(s) matched; no numbers for ['u1']"
    with pytest.raises(ConfigError, match="only 1 teacher"):  # B's rows do not hold t1..t3
        match_names(["org/t1", "t2", "T3", "u1"], ["b"], performance)


def test_an_aliases_file_adds_spellings_and_correlations_use_it(tmp_path):
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("house-teacher-a: Qwen2-7B-Instruct\nhouse-teacher-b: Gemma-2-9b-it\nstudent-v1: Qwen2-1.5B\n")
    performance = load_performance(str(TABLE6), aliases=str(aliases))
    assert key("house-teacher-b", performance.attrs["aliases"]) == "gemma-2-9b-it"
    teachers = ["house-teacher-a", "house-teacher-b", "Meta-Llama-3-8B-Instruct"]
    (match,) = match_names(teachers, ["models/student-v1"], performance)
    assert match.matched == {"house-teacher-a": "Qwen2-7B-Instruct", "house-teacher-b": "Gemma-2-9b-it",
                             "Meta-Llama-3-8B-Instruct": "Llama-3-8B-Instruct"}  # fmt: skip
    # the correlation pairs each teacher with its table row's AP: reward follows AP exactly here
    rows = performance[performance["base_model"] == "Qwen2-1.5B"].set_index("teacher")["ap"]
    ranking = pd.DataFrame({"teacher": teachers, "base_model": "models/student-v1",
                            "reward": [rows[v] for v in match.matched.values()]})  # fmt: skip
    table = correlations(ranking, performance, ["reward"])
    assert table.loc["reward", "models/student-v1"] == pytest.approx(1.0)
    assert table.loc["n_teachers", "models/student-v1"] == 3
    shipped = load_aliases()
    assert key("Llama-3.1-Minitron-4B-Width", shipped) == "llama-3.1-minitron-4b"


def test_a_users_alias_wins_over_the_shipped_one_for_the_same_spelling(tmp_path):
    """The docs: the file given with --aliases is read over the shipped aliases. Minitron-4B ships as an alias of
    Llama-3.1-Minitron-4B; a user who means another row of the table by it gets that row."""
    shipped = load_aliases()
    assert key("Minitron-4B", shipped) == "llama-3.1-minitron-4b"
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("Minitron-4B: Qwen2-1.5B\n")
    mine = load_aliases(str(aliases))
    assert key("Minitron-4B", mine) == "qwen2-1.5b"
    assert key("Llama-3.1-Minitron-4B-Width", mine) == "llama-3.1-minitron-4b"  # the other shipped ones stay
    performance = load_performance(str(TABLE6), aliases=str(aliases))
    teachers = ["Qwen2-7B-Instruct", "Gemma-2-9b-it", "Meta-Llama-3-8B-Instruct"]
    (match,) = match_names(teachers, ["org/Minitron-4B"], performance)
    assert match.table_name == "Qwen2-1.5B"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n", "expected a mapping"),
        ("a: [b]\n", "alias 'a' maps to \\['b'\\]"),
        ("a: b: c\n", "not valid YAML"),
        ("a: ''\n", "alias 'a' maps to ''"),
        ("a: true\n", "alias 'a' maps to True"),
    ],
)
def test_a_bad_aliases_file_is_an_error_naming_it(tmp_path, text, message):
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_aliases(path)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="missing.yaml: could not be read: No such file or directory$"):
        load_aliases(tmp_path / "missing.yaml")
