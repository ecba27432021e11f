"""Progress on a terminal and in a log: what a cluster job's log shows of a long stage."""

import re

from magpie_teach.progress import PROGRESS_EVERY_ENV, Progress, log_every, progress_line


def test_a_progress_line_states_count_share_rate_and_time_left():
    assert progress_line("reward", 25, 100, 10.0, "ex") == "reward: 25/100 ex (25%), 2.50 ex/s, ETA 0:00:30"
    assert progress_line("reward", 0, 100, 0.0, "ex").endswith("0.00 ex/s, ETA unknown")
    assert progress_line("teacher", 3, 3, 2.0).startswith("teacher: 3/3 rows (100%), 1.50 rows/s, ETA 0:00:00")
    assert progress_line("slow", 1, 4, 2.0) == "slow: 1/4 rows (25%), 0.50 rows/s, ETA 0:00:06"  # under 1 a second
    assert progress_line("one", 1, 1, 1.0).startswith("one: 1/1 rows (100%)")


def test_in_a_log_a_stage_prints_its_start_every_interval_and_its_end(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "0")  # a line at every update
    with Progress(3, "compat base", show=None) as progress:
        for _ in range(3):
            progress.update(1)
    lines = capsys.readouterr().err.strip().splitlines()  # capsys' stderr is not a terminal
    assert [re.match(r"compat base: (\d)/3 ex", line).group(1) for line in lines] == ["0", "1", "2", "3"]
    assert lines[-1].endswith("ETA 0:00:00")
    assert float(re.search(r"([0-9.]+) ex/s", lines[-1]).group(1)) > 1  # 3 examples in well under a second


def test_the_log_interval_is_read_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "3600")
    assert log_every() == 3600
    with Progress(3, "reward") as progress:
        progress.update(1)
        progress.update(2)
    assert [line.split(":")[1].split()[0] for line in capsys.readouterr().err.splitlines()] == ["0/3", "3/3"]
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "often")
    assert log_every() == 60.0
    monkeypatch.delenv(PROGRESS_EVERY_ENV)
    assert log_every() == 60.0


def test_forced_on_a_bar_counts_every_update_under_its_name(capsys):
    with Progress(3, "reward", show=True) as progress:
        progress.update(1)
        progress.update(2)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert bar.startswith("reward: 100%") and "3/3" in bar


def test_forced_off_prints_nothing(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_EVERY_ENV, "0")
    with Progress(2, "reward", show=False) as progress:
        progress.update(2)
    assert capsys.readouterr().err == ""
