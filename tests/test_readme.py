"""The README's and the docs' commands: the quick start is two commands, every `magpie-teach` command in them is
valid for the CLI as built, and those that need only shipped files run for real."""

import re
import shlex

import pytest

from tests.conftest import REPO

DOCS = ["README.md", "docs/walkthrough.md", *(f"docs/{page}.md" for page in ("generate", "rank", "concepts", "probe",
          "report", "paradox", "select", "route", "push", "train", "validate", "evaluate", "calibrate", "review", "scaling",
          "python-api", "demo")), "DEVELOPMENT.md"]  # fmt: skip
"""The README and the docs pages, in the order a walkthrough reads them (each verb's inputs come before it)."""
README = "\n".join((REPO / page).read_text() for page in DOCS)
"""Their text, one after the other: what the command tests read."""


def test_every_docs_page_is_read_and_linked_from_the_readme():
    pages = {str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md")} | {"DEVELOPMENT.md"}
    assert pages == set(DOCS) - {"README.md"}, pages ^ (set(DOCS) - {"README.md"})
    readme = (REPO / "README.md").read_text()
    assert all(f"]({page})" in readme for page in pages), [p for p in pages if f"]({p})" not in readme]
    assert len(readme.splitlines()) <= 200


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def commented_commands() -> list[tuple[list[str], str]]:
    """Every magpie-teach command line of the README's bash blocks (continuations joined) with its comment."""
    found = []
    for block in bash_blocks():
        for line in block.replace("\\\n", " ").splitlines():
            line, _, comment = line.partition(" #")
            line = line.strip().rstrip("&").strip()
            if "magpie_teach.cli" in line:
                line = "magpie-teach " + line.split("magpie_teach.cli", 1)[1]
            if line.startswith("magpie-teach"):
                found.append((shlex.split(line)[1:], comment.strip()))
    return found


def commands() -> list[list[str]]:
    """Every magpie-teach command of the README, as argv after `magpie-teach`."""
    return [argv for argv, _ in commented_commands()]


def test_quick_start_is_two_commands():
    quick = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", quick, re.S)[0]
    lines = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert lines == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci


@pytest.mark.parametrize("argv", commands(), ids=lambda argv: " ".join(argv[:2]))
def test_every_readme_command_parses(argv):
    from magpie_teach.cli import build_parser

    args = build_parser().parse_args(argv)  # an unknown flag or subcommand exits with status 2 here
    assert args.func is not None


def test_readme_has_commands_for_every_subcommand():
    seen = {argv[0] for argv in commands()}
    assert {
        "generate",
        "rank",
        "report",
        "paradox",
        "select",
        "route",
        "push",
        "hub",
        "train",
        "validate",
        "review",
    } <= seen


def run(*argv, cwd=REPO):
    from tests.readme_commands import run_readme_command

    result = run_readme_command(list(argv), capture_output=True, text=True, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_readme_commands_on_shipped_files_run(tmp_path):
    table = "src/magpie_teach/resources/paper_table6_performance.csv"
    assert ["paradox", "--performance", table] in commands()
    assert ["report", "--performance", table, "--output", "runs/paper"] in commands()
    out = run("paradox", "--performance", table).stdout
    assert "Qwen2" in out
    (tmp_path / "src").symlink_to(REPO / "src")  # the README names the table by its repo path
    run("report", "--performance", table, "--output", "runs/paper", cwd=tmp_path)
    assert (tmp_path / "runs" / "paper" / "report.html").exists()
    assert ["tiny", "--output", "outputs/models"] in commands()
    assert ["generate", "pipelines/configs/tiny_cpu.yaml", "--dry-run"] in commands()
    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")  # the shipped config names the sample by its repo path
    run("tiny", "--output", "outputs/models", cwd=tmp_path)
    dry = run("generate", "pipelines/configs/tiny_cpu.yaml", "--dry-run", cwd=tmp_path).stdout
    assert "dry run: the config is valid" in dry


@pytest.mark.slow
def test_readme_generate_commands_run(tmp_path):
    """The README's generate commands on the shipped configs, as written (tiny models built first, as it says)."""
    import pandas as pd

    for argv in (
        ["generate", "pipelines/configs/tiny_cpu.yaml"],
        ["generate", "pipelines/configs/tiny_cpu_magpie_scored.yaml"],
        ["report", "outputs/generate-magpie/rank", "--output", "outputs/generate-magpie/report"],
    ):
        assert argv in commands()
    (tmp_path / "pipelines").symlink_to(REPO / "pipelines")
    (tmp_path / "src").symlink_to(REPO / "src")
    run("tiny", "--output", "outputs/models", cwd=tmp_path)
    run("generate", "pipelines/configs/tiny_cpu.yaml", cwd=tmp_path)
    responses = pd.read_parquet(tmp_path / "outputs" / "generate-tiny" / "responses.parquet")
    assert set(responses["teacher"]) == {"tiny-greedy", "tiny-sampled"}
    printed = run("generate", "pipelines/configs/tiny_cpu_magpie_scored.yaml", cwd=tmp_path).stdout
    assert "p_best" in printed and "ranked by CAR" in printed
    ranking = pd.read_csv(tmp_path / "outputs" / "generate-magpie" / "rank" / "ranking.csv")
    assert set(ranking["teacher"]) == {"tiny-greedy", "tiny-best-of-2"} and ranking["base_model"].nunique() == 2
    run("report", "outputs/generate-magpie/rank", "--output", "outputs/generate-magpie/report", cwd=tmp_path)
    assert (tmp_path / "outputs" / "generate-magpie" / "report" / "report.html").exists()


def test_every_relative_link_of_the_readme_and_docs_points_at_a_file_that_exists():
    import re

    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / page).read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (REPO / page).parent.joinpath(target).exists():
                broken.append(f"{page}: {target}")
    assert not broken, broken
