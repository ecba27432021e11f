"""Settings shared by verbs: one default and one check each, and downstream CAR settings resolved from rank's."""

import pytest

from magpie_teach.errors import ConfigError
from magpie_teach.settings import (
    DEFAULT_BETA,
    CARSettings,
    ModelRunSettings,
    RecordedCARSettings,
    check_car,
)


@pytest.mark.parametrize(
    "beta, shift, where, message",
    [
        (-0.1, "none", "--", "--beta must be >= 0, got -0.1"),
        (1.0, "lots", "--", "--reward-shift 'lots': expected 'none', 'auto' or a number"),
        (-1.0, "none", "scoring.", "scoring.beta must be >= 0, got -1.0"),
        (1.0, "x", "scoring.", "scoring.reward_shift 'x': expected 'none', 'auto' or a number"),
    ],
)
def test_check_car_names_the_setting_as_the_user_wrote_it(beta, shift, where, message):
    with pytest.raises(ConfigError) as err:
        check_car(beta, shift, where)
    assert str(err.value) == message


@pytest.mark.parametrize("beta, shift", [(0.0, "none"), (3.0, "auto"), (0.5, "1.5"), (2.0, -2.0)])
def test_valid_car_settings_pass(beta, shift):
    check_car(beta, shift)
    CARSettings(beta=beta, reward_shift=str(shift)).check_car()


def test_model_run_checks_their_bounds():
    ModelRunSettings(max_length=2, batch_tokens=1).check_run()  # the smallest valid values
    with pytest.raises(ConfigError, match=r"^--max-length must be >= 2, got 1$"):
        ModelRunSettings(max_length=1).check_run()
    with pytest.raises(ConfigError, match=r"^scoring.batch_tokens must be >= 1, got 0$"):
        ModelRunSettings(batch_tokens=0).check_run("scoring.")
    with pytest.raises(ConfigError, match=r"^--dtype 'fp8' is not one of float32, bfloat16, float16, auto$"):
        ModelRunSettings(dtype="fp8").check_run()


@pytest.mark.parametrize(
    "given, recorded, expected",
    [
        ({}, {"beta": 0.5, "reward_shift": "auto"}, (0.5, "auto", "recorded by rank in R")),
        ({"beta": 2.0}, {"beta": 0.5, "reward_shift": "auto"}, (2.0, "auto", "recorded by rank in R; beta from the command line")),
        ({"reward_shift": "none"}, {"beta": 0.5, "reward_shift": "auto"}, (0.5, "none", "recorded by rank in R; reward_shift from the command line")),
        ({"beta": 1.0, "reward_shift": "2"}, {"beta": 0.5, "reward_shift": "auto"}, (1.0, "2", "command line")),
        ({}, None, (DEFAULT_BETA, "none", "defaults: no rank_config.yaml beside the scores")),
        ({"reward_shift": "auto"}, None, (DEFAULT_BETA, "auto", "defaults: no rank_config.yaml beside the scores; reward_shift from the command line")),
    ],
)  # fmt: skip
def test_downstream_car_settings_come_from_the_command_line_then_rank_then_defaults(given, recorded, expected):
    choice = RecordedCARSettings(**given).car(recorded, recorded_from="R")
    assert (choice.beta, choice.reward_shift, choice.source) == expected
    assert choice.describe() == f"CAR with beta={expected[0]:g}, reward shift {expected[1]} ({expected[2]})"


def test_recorded_settings_are_checked_when_given():
    RecordedCARSettings().check_car()  # unset: nothing to check yet
    with pytest.raises(ConfigError, match="--beta must be >= 0"):
        RecordedCARSettings(beta=-1.0).check_car()
    with pytest.raises(ConfigError, match="--reward-shift 'x'"):
        RecordedCARSettings(reward_shift="x").check_car()
