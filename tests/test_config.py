from dataclasses import dataclass, field

import pytest

from magpie_teach.config import build_config, from_dict
from magpie_teach.errors import ConfigError


@dataclass
class Sampling:
    temperature: float = 0.0
    max_new_tokens: int = 512


@dataclass
class Teacher:
    name: str
    backend: str = "transformers"
    sampling: Sampling = field(default_factory=Sampling)
    base_url: str | None = None


@dataclass
class Run:
    teachers: list[Teacher]
    batch_size: int = 16
    resume: bool = True


def test_nested_values_are_built():
    run = from_dict(Run, {"teachers": [{"name": "a"}, {"name": "b", "sampling": {"temperature": 1}}], "batch_size": 8})
    assert run.teachers[1].sampling.temperature == 1.0 and isinstance(run.teachers[1].sampling.temperature, float)
    assert run.teachers[0].sampling == Sampling() and run.batch_size == 8 and run.teachers[0].base_url is None


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"teachers": [{"name": "a"}, {"name": "b"}, {"name": "c", "sampling": {"temprature": 0.7}}]},
         "teachers[2].sampling.temprature: unknown key; did you mean 'temperature'?"),
        ({"teachers": [{"backend": "vllm"}]}, "teachers[0].name: missing required key"),
        ({"teachers": [{"name": "a"}], "batch_size": "8"}, "batch_size: expected int, got '8'"),
        ({"teachers": [{"name": "a"}], "batch_size": 2.5}, "batch_size: expected int, got 2.5"),
        ({"teachers": [{"name": "a"}], "resume": "yes"}, "resume: expected true or false, got 'yes'"),
        ({"teachers": {"name": "a"}}, "teachers: expected a list"),
        ({"teachers": [{"name": None}]}, "teachers[0].name: may not be null"),
        ({"teachers": [], "bacth_size": 3}, "bacth_size: unknown key; did you mean 'batch_size'?"),
    ],
)  # fmt: skip
def test_errors_name_the_key_path(values, message):
    with pytest.raises(ConfigError) as err:
        from_dict(Run, values)
    assert message in str(err.value)


def test_flat_configs_from_yaml_and_flags(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 4\n")

    @dataclass
    class Flat:
        batch_size: int = 16
        name: str = "x"

    assert build_config(Flat, {"name": "y", "batch_size": None}, str(config)) == Flat(batch_size=4, name="y")
    config.write_text("- a\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        build_config(Flat, {}, str(config))


def test_a_commands_yaml_takes_the_flag_spelling_too_and_help_names_the_yaml_key(tmp_path):
    import argparse

    from magpie_teach.config import add_dataclass_arguments
    from magpie_teach.ranking.rank import RankConfig

    config = tmp_path / "rank.yaml"
    config.write_text("data: d.parquet\noutput: out\nbase-model: [m1, m2]\nreward_model: r\nbootstrap-seed: 7\n")
    built = build_config(RankConfig, {}, str(config))
    assert (built.output_dir, built.base_models, built.reward_model, built.bootstrap_seed) == (
        "out",
        ["m1", "m2"],
        "r",
        7,
    )
    config.write_text("data: d.parquet\noutput: out\noutput_dir: other\nbase_models: [m]\n")
    with pytest.raises(ConfigError, match="'output' and 'output_dir' both set 'output_dir'; keep one"):
        build_config(RankConfig, {}, str(config))
    config.write_text("data: d.parquet\noutput: out\nbase_model: [m]\nbase_modle: [x]\n")
    with pytest.raises(ConfigError, match="unknown key 'base_modle'; did you mean 'base_models'"):
        build_config(RankConfig, {}, str(config))
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, RankConfig)
    text = " ".join(parser.format_help().split())
    assert "[YAML key output_dir]" in text and "[YAML key base_models]" in text
    assert "[YAML key data]" not in text  # a flag spelt like its key needs no note
