"""The output-folder contract: atomic writes that follow the umask, one run per folder, stale files removed."""

import os
import stat
import subprocess
import sys

import pytest

from magpie_teach.artefacts import LOCK, OUTPUTS, RunOutputs, locked, slug, write_atomic
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["correlations.csv", "notes.txt", "ranking.csv"]
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
