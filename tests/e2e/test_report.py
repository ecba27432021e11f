"""`magpie-teach report`: Markdown + PNG and a self-contained HTML page, rendered in headless Chromium."""

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO

PAPER_TABLE = REPO / "src" / "magpie_teach" / "resources" / "paper_table6_performance.csv"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def run_report(*args):
    result = subprocess.run(
        [sys.executable, "-m", "magpie_teach.cli", "report", *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def chromium(tmp_path, *args):
    assert CHROMIUM, "Debian's chromium is not installed (make test installs it)"
    profile = tmp_path / "chromium-profile"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def performance_for_sample(tmp_path_factory, tiny_suite):
    """Made-up benchmark numbers for the sample's three teachers on the tiny base model."""
    path = tmp_path_factory.mktemp("perf") / "performance.csv"
    base = Path(tiny_suite.base_small).name
    pd.DataFrame(
        {"teacher": ["tiny-teacher-terse", "tiny-teacher-thorough", "tiny-teacher-lists"], "base_model": [base] * 3,
         "AE2_LC_WR": [10.0, 30.0, 20.0], "ArenaHard_WR": [12.0, 28.0, 18.0]}
    ).to_csv(path, index=False)  # fmt: skip
    return path


def test_report_of_a_ranking_renders_in_chromium_with_its_figures(ranked_sample, performance_for_sample, tmp_path):
    out = tmp_path / "report"
    result = run_report(str(ranked_sample), "--performance", str(performance_for_sample), "--output", str(out))
    assert "Which metric predicts teacher quality" in result.stdout
    markdown = (out / "report.md").read_text()
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert figures == ["figures/ranking.png", "figures/reward_vs_compat_loss.png", "figures/metric_correlations.png"]
    for figure in figures:
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ranking = pd.read_csv(ranked_sample / "ranking.csv")
    best = ranking.loc[ranking["car"].idxmax(), "teacher"]
    assert f"-> {best}" in markdown
    # the bootstrap's verdict per base model, and the intervals and p_best beside each teacher
    summary = json.loads((ranked_sample / "summary.json").read_text())
    assert summary["confidence"]["sentences"] and all(s in markdown for s in summary["confidence"]["sentences"])
    header = next(line for line in markdown.splitlines() if line.startswith("| base_model | teacher | car"))
    assert header.startswith("| base_model | teacher | car ↑ | car_ci_low | car_ci_high | p_best ↑ |")
    # the setup, the metrics' disagreement (computed here from the ranking), what next, and no local paths
    assert "## Setup" in markdown and "Teachers: tiny-teacher-" in markdown and "with beta = 3." in markdown
    by_reward = ranking.loc[ranking["reward"].idxmax(), "teacher"]
    if by_reward != best:
        assert f"reward alone would pick {by_reward}" in markdown and f"CAR picks {best}" in markdown
    else:
        assert "Reward alone and CAR pick the same teacher for every base model here." in markdown
    assert "`magpie-teach select --scores " in markdown and "--base-model tiny-llama-s" in markdown
    assert str(ranked_sample.parent) not in markdown and str(tmp_path) not in markdown
    # the best CAR is bold in its row, and nowhere else in that column
    row = next(line for line in markdown.splitlines() if f"| {best} |" in line)
    assert row.split(" | ")[2].startswith("**")
    page = (out / "report.html").read_text()
    assert 'src="http' not in page and "<script" not in page  # self-contained, static
    text = re.sub(r"<[^>]+>", "", re.sub(r'src="data:[^"]+"', "", page))  # what a reader sees
    assert "**" not in text and "`" not in text and "*and*" not in text  # no Markdown leaks into the page
    assert "<em>and</em>" in page and "<code>magpie-teach select --scores" in page
    inlined = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(inlined) == 3 and all(base64.b64decode(data)[:4] == b"\x89PNG" for data in inlined)

    # Chromium loads the page in a frame and reports, from inside the browser, that every image decoded
    check = tmp_path / "check.html"
    check.write_text(
        f"<html><body><iframe id=f src='{(out / 'report.html').as_uri()}' width=1200 height=800></iframe><script>"
        "document.getElementById('f').onload=function(){var d=this.contentDocument;var imgs=[...d.images];"
        "document.body.setAttribute('data-result', imgs.length+' images, '+imgs.filter(i=>i.complete&&i.naturalWidth>100).length+' decoded, '"
        "+d.querySelectorAll('table').length+' tables, title='+d.title);};</script></body></html>"
    )
    dom = chromium(
        tmp_path, "--allow-file-access-from-files", "--virtual-time-budget=10000", "--dump-dom", check.as_uri()
    )
    match = re.search(r'data-result="([^"]+)"', dom.stdout)
    assert match, dom.stdout[-2000:] + dom.stderr[-2000:]
    assert match.group(1).startswith("3 images, 3 decoded, ") and "title=Which teacher" in match.group(1)
    shot = tmp_path / "shot.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri())
    from PIL import Image

    pixels = Image.open(shot).convert("L")
    assert pixels.getextrema()[0] < 100  # something dark was drawn: text and figures, not a blank page


def test_report_from_the_papers_table_shows_its_paradox_pairs_and_best_teachers(tmp_path):
    out = tmp_path / "paper"
    run_report("--performance", str(PAPER_TABLE), "--output", str(out))
    markdown = (out / "report.md").read_text()
    table = pd.read_csv(PAPER_TABLE, comment="#")
    table["ap"] = (table["AE2_LC_WR"] + table["ArenaHard_WR"]) / 2
    for base, group in table.groupby("base_model"):
        best = group.loc[group["ap"].idxmax(), "generator"]
        assert f"| {base} | {best} |" in markdown
    # one paradox pair computed here, independently: Gemma-2-9b-it beats Gemma-2-27b-it on Qwen2.5-3B
    gemma = table[(table["base_model"] == "Qwen2.5-3B") & table["generator"].isin(["Gemma-2-9b-it", "Gemma-2-27b-it"])]
    ap = dict(zip(gemma["generator"], gemma["ap"]))
    assert ap["Gemma-2-9b-it"] > ap["Gemma-2-27b-it"]
    assert "| Qwen2.5-3B | Gemma 2 | Gemma-2-9b-it |" in markdown
    assert (out / "figures" / "paradox_pairs.png").exists()


def test_report_needs_an_input_and_leaves_no_folder_without_one(tmp_path):
    result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", "report"], capture_output=True, text=True,
                            cwd=tmp_path)  # fmt: skip
    assert (
        result.returncode == 2
        and "give a `rank` output folder, --performance FILE, --calibration DIR, --evaluation DIR" in result.stderr
    )
    assert not list(tmp_path.iterdir())  # no report/ with a lock and an unfinished manifest


def test_report_of_a_calibration_states_its_fit_and_shows_its_figure(tmp_path):
    import numpy as np

    from magpie_teach.cli import main

    rng = np.random.default_rng(2)
    rows = [{"teacher": f"t{i}", "base_model": b, "reward": rng.uniform(1, 3), "compat_loss": rng.uniform(0.5, 2),
             "car": 0.0, "car_reward_shift": 0.0} for b in ("b1", "b2", "b3") for i in range(5)]  # fmt: skip
    ranking = pd.DataFrame(rows)
    (tmp_path / "rank").mkdir()
    ranking.to_csv(tmp_path / "rank" / "ranking.csv", index=False)
    ap = np.log(ranking["reward"] / (1 + 0.5 * ranking["compat_loss"]))
    ranking.assign(AE2_LC_WR=ap, ArenaHard_WR=ap)[["teacher", "base_model", "AE2_LC_WR", "ArenaHard_WR"]].to_csv(
        tmp_path / "perf.csv", index=False
    )
    calibration = tmp_path / "calibration"
    assert main(["calibrate", "--scores", str(tmp_path / "rank"), "--performance", str(tmp_path / "perf.csv"),
                 "--output", str(calibration)]) == 0  # fmt: skip
    fit = json.loads((calibration / "calibration.json").read_text())
    out = tmp_path / "report"
    run_report("--calibration", str(calibration), "--output", str(out))
    markdown = (out / "report.md").read_text()
    low, high = fit["stable_beta_range"]
    assert (
        f"CAR's best beta is {fit['best_beta']:.4g}, the same order of teachers for any beta in [{low:.4g}, "
        f"{high:.4g}] (where the fit is stable, not a confidence interval)" in markdown
    )
    share = fit["choice_bootstrap"]["same_metric_share"]
    assert f"Teachers drawn again (200 bootstrap replicates) choose car {100 * share:.0f}% of the time" in markdown
    assert f"mean rho {fit['held_out_mean_rho']['fitted']:.3f} for the fitted choice" in markdown
    assert "![Which beta (calibration)](figures/calibration.png)" in markdown
    assert (out / "figures" / "calibration.png").read_bytes() == (calibration / "calibration.png").read_bytes()
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_scatter_labels_cover_no_other_label_nor_point_and_each_equal_car_line_shows_its_value():
    """Twelve teachers in two tight clusters per base model (the Zoo's families sit this close): the labels spread
    out; bounding boxes read from the drawn figure."""
    import matplotlib
    import numpy as np
    from matplotlib.text import Text

    matplotlib.use("Agg")
    from magpie_teach.report import reward_vs_loss_axes

    rng = np.random.default_rng(0)
    rows = []
    for base in ("org/base-a", "org/base-b"):
        for i in range(12):
            cluster = i % 2
            rows.append({"teacher": f"org/teacher-{i}-instruct", "base_model": base, "car_beta": 3.0,
                         "reward": 1.0 + cluster + rng.normal(0, 1e-3), "car_reward_shift": 0.5,
                         "compat_loss": 1.5 + 0.5 * cluster + rng.normal(0, 1e-3)})  # fmt: skip
    ranking = pd.DataFrame(rows)
    ranking["car"] = (ranking["reward"] + 0.5) / (1 + 3.0 * ranking["compat_loss"])
    fig = reward_vs_loss_axes(ranking)
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes[:2]:
        labels = [t for t in ax.texts if t.get_text().startswith("teacher-")]
        iso = [t for t in ax.texts if t.get_text().startswith("CAR=")]
        assert len(labels) == 12 and len(iso) == 3
        boxes = []
        for label in labels:  # the texts' boxes (a leader line may cross)
            label.update_positions(renderer)
            boxes.append(Text.get_window_extent(label, renderer))
        iso_boxes = [t.get_window_extent(renderer) for t in iso]
        points = ax.transData.transform(ax.collections[0].get_offsets())
        frame = ax.get_window_extent(renderer)
        for i, box in enumerate(boxes):
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            assert not any(box.overlaps(other) for other in boxes[i + 1 :] + iso_boxes)
            assert not any(box.contains(x, y) for x, y in points)
        for box in iso_boxes:
            assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
        for text in iso:  # the value printed is the CAR of the line it sits on: (r + shift) / (1 + beta L)
            x, y = text.xy
            assert float(text.get_text()[4:]) == pytest.approx((y + 0.5) / (1 + 3.0 * x), rel=5e-3)
            assert ax.get_ylim()[0] <= y <= ax.get_ylim()[1]
    # the demo's geometry: a small reward gap, a wide loss range, so the equal-CAR lines leave through the top
    demo = pd.DataFrame({"teacher": ["greedy", "t0.7", "t1.2"], "base_model": "b", "car_beta": 3.0,
                         "car_reward_shift": 0.0, "reward": [2.62, 2.65, 2.79], "compat_loss": [1.0, 1.3, 6.5]})  # fmt: skip
    demo["car"] = demo["reward"] / (1 + 3.0 * demo["compat_loss"])
    fig = reward_vs_loss_axes(demo)
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    frame = ax.get_window_extent(renderer)
    iso = [t for t in ax.texts if t.get_text().startswith("CAR=")]
    assert len(iso) == 3 and any(t.xy[1] == pytest.approx(ax.get_ylim()[1], rel=0.02) for t in iso)  # one at the top
    for text in iso:
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text.get_text()


def test_report_of_an_evaluation_shows_each_students_win_rates_with_their_intervals(tmp_path):
    """An `evaluate` folder written here (judgements, and win rates computed from them by the library): the report
    states the baseline, the prompts and the unread verdicts, and tabulates every rate with its interval."""
    from magpie_teach.scoring.winrates import win_rates

    rng = np.random.default_rng(0)
    judgements = pd.DataFrame([
        {"id": f"p{i}", "instruction": "x", "student": s, "baseline": "/models/my-baseline", "preference": p,
         "parsed": not np.isnan(p), "length_diff": int(rng.integers(-20, 20))}
        for s, bias in (("student-a", 0.7), ("student-b", 0.3)) for i in range(30)
        for p in [np.nan if i == 0 and s == "student-b" else float(rng.uniform() < bias)]
    ])  # fmt: skip
    folder = tmp_path / "evaluate"
    folder.mkdir()
    judgements.to_parquet(folder / "judgements.parquet", index=False)
    rates = win_rates(judgements[judgements["parsed"]], 200, 0.95, 0)
    rates.to_csv(folder / "win_rates.csv", index=False)
    out = tmp_path / "report"
    run_report("--evaluation", str(folder), "--output", str(out))
    markdown = (out / "report.md").read_text()
    assert "2 student(s) against the baseline my-baseline on 30 prompts" in markdown
    assert "1 of 60 verdict(s) could not be read" in markdown
    for row in rates.itertuples():
        cells = [f"{getattr(row, c):.1f} [{getattr(row, c + '_low'):.1f}, {getattr(row, c + '_high'):.1f}]"
                 for c in ("win_rate", "lc_win_rate", "bt_score")]  # fmt: skip
        assert f"| {row.student} | {row.n} | " + " | ".join(cells) + " |" in markdown
    assert (out / "figures" / "evaluation.png").exists()
    # the words follow the intervals, computed here: above 50 beats, below loses to, across cannot be told apart
    words = []
    for row in rates.itertuples():
        word = (
            "beats" if row.win_rate_low > 50 else "loses to" if row.win_rate_high < 50 else "cannot be told apart from"
        )
        words.append(f"{row.student} {word} my-baseline")
    assert "By the win rate's interval: " + "; ".join(words) + "." in markdown


def test_the_measured_best_teacher_shows_its_raw_win_rate_beside_ap(tmp_path):
    """An `evaluate` performance table whose best student by AP (mean of LC and Bradley-Terry) is not the best by
    raw win rate: the report names the best by AP, and shows each one's raw win rate beside it, so the page does
    not read as if the worse raw rate won."""
    rows = [("s-long", 40.0, 64.0, 43.0), ("s-plain", 52.0, 50.0, 48.0), ("s-short", 47.0, 45.0, 44.0)]
    table = pd.DataFrame([{"teacher": t, "base_model": "base", "AE2_LC_WR": lc, "ArenaHard_WR": bt, "win_rate": wr}
                          for t, lc, bt, wr in rows])  # fmt: skip
    table.to_csv(tmp_path / "performance.csv", index=False)
    out = tmp_path / "report"
    run_report("--performance", str(tmp_path / "performance.csv"), "--output", str(out))
    markdown = (out / "report.md").read_text()
    ap = {t: (lc + bt) / 2 for t, lc, bt, _ in rows}
    best = max(ap, key=ap.get)
    raw = dict((t, wr) for t, _, _, wr in rows)[best]
    assert f"| base | {best} | {ap[best]:.4g} | {raw:.4g} |" in markdown
    assert "| base_model | best teacher | AP | raw win rate |" in markdown
    assert "AP is not the raw win rate" in markdown


def test_report_matches_names_through_the_aliases_file_as_rank_does(ranked_sample, tiny_suite, tmp_path):
    """A performance table that spells the teachers its own way: `report --aliases` matches them as `rank
    --aliases` does, so the correlations it shows are computed; without the file no teacher matches (one line)."""
    base = Path(tiny_suite.base_small).name
    table = tmp_path / "house.csv"
    pd.DataFrame({"teacher": ["house-a", "house-b", "house-c"], "base_model": [base] * 3,
                  "AE2_LC_WR": [10.0, 30.0, 20.0], "ArenaHard_WR": [12.0, 28.0, 18.0]}).to_csv(table, index=False)  # fmt: skip
    aliases = tmp_path / "aliases.yaml"
    aliases.write_text("tiny-teacher-terse: house-a\ntiny-teacher-thorough: house-b\ntiny-teacher-lists: house-c\n")
    run_report(str(ranked_sample), "--performance", str(table), "--aliases", str(aliases), "--output",
               str(tmp_path / "with"))  # fmt: skip
    text = (tmp_path / "with" / "report.md").read_text()
    assert "Spearman" in text and "n_teachers" not in text.split("Spearman", 1)[0]
    rho = re.search(r"\| reward \| (-?[0-9.]+)", text)
    assert rho, text[:3000]
    result = subprocess.run([sys.executable, "-m", "magpie_teach.cli", "report", str(ranked_sample), "--performance",
                             str(table), "--output", str(tmp_path / "without")], capture_output=True, text=True)  # fmt: skip
    assert result.returncode != 0 and "only 0 teacher(s) have performance numbers" in result.stderr, result.stderr[
        -2000:
    ]
