"""The output-folder contract: atomic writes that follow the umask, one run per folder, stale files removed."""

import os
import stat
import subprocess
import sys

import pytest

from magpie_teach.artefacts import (
    LOCK,
    MANIFEST,
    OUTPUTS,
    RunOutputs,
    content_digest,
    locked,
    slug,
    verify_run,
    write_atomic,
)
from magpie_teach.errors import DataError


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        write_atomic(tmp_path / "a" / "f.txt", lambda tmp: open(tmp, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "f.txt").stat().st_mode) == mode
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.txt"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def broken(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_atomic(path, broken)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_a_folder_in_use_is_refused_and_released_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from magpie_teach.artefacts import locked\nimport time\nwith locked({str(tmp_path)!r}):\n"
         "    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DataError, match=f"in use by another run \\(pid {holder.pid}\\)"):
        with locked(tmp_path):
            pass
    holder.kill()  # SIGKILL: the kernel releases the lock
    holder.wait()
    with locked(tmp_path):
        assert (tmp_path / LOCK).read_text() == f"pid {os.getpid()}"


def test_finish_removes_only_the_kinds_files_this_run_did_not_write(tmp_path):
    for name in ("dropped.csv", "correlations.csv", "notes.txt"):
        (tmp_path / name).write_text("earlier run")
    files = RunOutputs(tmp_path, "rank")
    files.write("ranking.csv", lambda tmp: open(tmp, "w").write("teacher\n"))
    files.write("correlations.csv", lambda tmp: open(tmp, "w").write("metric\n"))
    assert files.finish() == ["dropped.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "correlations.csv",
        "manifest.json",
        "notes.txt",
        "ranking.csv",
    ]
    assert "dropped.csv" in OUTPUTS["rank"] and "notes.txt" not in OUTPUTS["rank"]


def test_slug_keeps_safe_characters_only():
    assert slug("Qwen/Qwen2.5-3B Instruct:v1") == "Qwen_Qwen2.5-3B_Instruct_v1"


def test_a_run_that_wrote_nothing_leaves_no_folder(tmp_path):
    with pytest.raises(DataError, match="bad input"):
        with locked(tmp_path / "new" / "out"):
            raise DataError("bad input")
    assert not (tmp_path / "new" / "out").exists()
    (tmp_path / "kept").mkdir()
    with locked(tmp_path / "kept"):
        pass
    assert (tmp_path / "kept").exists()  # a folder that was there stays


def _finished_rank(folder):
    files = RunOutputs(folder, "rank")
    for name, text in (("ranking.csv", "teacher,car\nt1,0.5\n"), ("summary.json", '{"beta": 3}'),
                       ("rank_config.yaml", "beta: 3\n")):  # fmt: skip
        files.write(name, lambda tmp, text=text: open(tmp, "w").write(text))
    files.finish()
    return files


def test_a_finished_run_lists_each_file_with_its_digest_and_reads_back(tmp_path):
    files = _finished_rank(tmp_path)
    manifest = verify_run(tmp_path, "push")
    assert manifest["kind"] == "rank" and manifest["complete"] is True and manifest["run_id"] == files.run_id
    assert manifest["files"] == {
        n: content_digest(tmp_path / n) for n in ("rank_config.yaml", "ranking.csv", "summary.json")
    }
    assert verify_run(tmp_path / "nothing-here", "push") is None  # a folder without a manifest is read as it is


def test_a_run_killed_while_writing_leaves_a_folder_every_reader_refuses(tmp_path):
    """The issue's case: a new ranking.csv beside the old run's config and summary, left by a killed `rank`."""
    _finished_rank(tmp_path)
    second = RunOutputs(tmp_path, "rank")  # the next run starts ...
    second.write("ranking.csv", lambda tmp: open(tmp, "w").write("teacher,car\nt2,0.9\n"))  # ... and is killed
    with pytest.raises(DataError) as err:
        verify_run(tmp_path, "push")
    assert str(err.value) == (f"{tmp_path}: its `rank` run did not finish (killed, or still running): push reads "
                              "only a finished run; rerun `magpie-teach rank` into it")  # fmt: skip


def test_a_file_changed_or_left_by_another_run_is_named(tmp_path):
    files = _finished_rank(tmp_path)
    (tmp_path / "summary.json").write_text('{"beta": 1}')  # copied in from another run
    with pytest.raises(
        DataError, match=rf"summary.json: changed since the `rank` run wrote .* \(run {files.run_id}\)"
    ):
        verify_run(tmp_path, "report")
    _finished_rank(tmp_path)
    (tmp_path / "dropped.csv").write_text("id\n")  # one of rank's files that this run did not write
    with pytest.raises(DataError, match="dropped.csv: not written by the `rank` run .*another run's leftover"):
        verify_run(tmp_path, "select")
    (tmp_path / "dropped.csv").unlink()
    (tmp_path / "ranking.csv").unlink()
    with pytest.raises(DataError, match="ranking.csv: missing, though the `rank` run"):
        verify_run(tmp_path, "push")


def test_a_verb_refuses_a_folder_that_holds_another_verbs_run(tmp_path):
    _finished_rank(tmp_path / "by-manifest")
    with pytest.raises(DataError, match=r"it holds a `rank` run \(manifest.json\); a folder holds one run"):
        RunOutputs(tmp_path / "by-manifest", "select")
    (tmp_path / "by-files").mkdir()
    (tmp_path / "by-files" / "ranking.csv").write_text("teacher\n")  # written before manifests existed
    with pytest.raises(DataError, match="it holds a `rank` run's ranking.csv"):
        RunOutputs(tmp_path / "by-files", "select")
    assert not (tmp_path / "by-files" / MANIFEST).exists()  # refused before anything was written
    RunOutputs(tmp_path / "by-manifest", "rank")  # the same verb again replaces its own run


def test_the_command_record_joins_the_finished_runs_manifest(tmp_path):
    from magpie_teach.artefacts import COMMAND_FILE, record_command

    _finished_rank(tmp_path)
    record_command(tmp_path, ["rank", "--beta", "3"])
    manifest = verify_run(tmp_path, "push")
    assert manifest["command"] == ["rank", "--beta", "3"]
    assert manifest["files"][COMMAND_FILE] == content_digest(tmp_path / COMMAND_FILE)
    RunOutputs(tmp_path, "rank")  # a new run: the old command is not left for the card to read
    assert not (tmp_path / COMMAND_FILE).exists()
