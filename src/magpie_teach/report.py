"""`magpie-teach report`: a readable report of a teacher ranking, as Markdown with PNG figures and as one
self-contained HTML page (figures inlined), from any `rank` output and/or a performance table.

Sections, each where its inputs exist:
* the teacher ranking per base model by CAR, with the baselines beside it (figure + table);
* reward against compatibility loss per teacher, with CAR iso-lines (CAR = r / (1 + beta * L));
* Spearman rho of each metric against performance per base model (the paper's Table 4 layout);
* the Larger Models' Paradox pairs and the best teacher per base model, from a performance table.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from magpie_teach.artefacts import read_rank_folder, slug
from magpie_teach.errors import ConfigError, DataError
from magpie_teach.hub.cards import markdown_table
from magpie_teach.scoring.metrics import (
    METRIC_DIRECTIONS,
    METRIC_LABELS,
    SHOWN_METRICS,
    short_name,
)
from magpie_teach.settings import AliasSettings, PerformanceSettings

LABELS = {**METRIC_LABELS, "logprob_norm": "log-prob"}  # and a per-example score's, shown in its figure


@dataclass
class ReportConfig(PerformanceSettings, AliasSettings):
    rank_dir: str | None = field(
        default=None,
        metadata={
            "help": "A `rank` output folder (ranking.csv, scores.parquet, correlations.csv).",
            "positional": True,
        },
    )
    output_dir: str = field(default="report", metadata={"help": "Where report.md, report.html and figures/ go.", "flag": "--output"})  # fmt: skip
    performance: str | None = field(
        default=None,
        metadata={"help": "CSV of teacher, base_model and benchmark columns (e.g. the paper's Table 6): correlations, paradox pairs, best teachers."},
    )  # fmt: skip
    calibration: str | None = field(
        default=None,
        metadata={"help": "A `calibrate` output folder: its beta fit, held-out figures and mean rho against beta."},
    )
    evaluation: str | None = field(
        default=None,
        metadata={
            "help": "An `evaluate` output folder: the students' win rates against the baseline, with intervals."
        },
    )
    title: str = field(default="Which teacher for which base model?", metadata={"help": "Report title."})


@dataclass
class Section:
    title: str
    text: str = ""
    figure: Path | None = None
    table: pd.DataFrame | None = None


def _figure_path(out: Path, name: str) -> Path:
    (out / "figures").mkdir(parents=True, exist_ok=True)
    return out / "figures" / f"{name}.png"


def _save(fig, path: Path) -> Path:  # noqa: ANN001 - a matplotlib Figure
    import matplotlib.pyplot as plt

    from magpie_teach.artefacts import write_atomic

    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 3)
    return math.ceil(n / cols), cols


def ranking_figure(ranking: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(ranking["base_model"]))
    rows, cols = _grid(len(bases))
    teachers = ranking["teacher"].nunique()
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 0.45 * teachers * rows + 1.6), squeeze=False)
    for ax, base in zip(axes.flat, bases):
        group = ranking[ranking["base_model"] == base].sort_values("car")
        colors = ["#d1495b" if i == len(group) - 1 else "#8da9c4" for i in range(len(group))]
        errors = None
        if "car_ci_low" in group:  # the bootstrap interval of each teacher's CAR
            errors = np.vstack([group["car"] - group["car_ci_low"], group["car_ci_high"] - group["car"]]).clip(0)
        ax.barh(group["teacher"].map(short_name), group["car"], color=colors, xerr=errors, capsize=3,
                error_kw={"elinewidth": 0.8, "ecolor": "#333333"})  # fmt: skip
        if "p_best" in group:
            right = (group["car_ci_high"] if "car_ci_high" in group else group["car"]).max()
            for y, p_best in enumerate(group["p_best"]):
                ax.annotate(f"p(best)={p_best:.2f}", (right, y), xytext=(6, 0), textcoords="offset points",
                            va="center", fontsize=7, color="#555555", annotation_clip=False)  # fmt: skip
        ax.set_title(f"base: {short_name(base)}", fontsize=10)
        ax.set_xlabel("CAR (higher is better)")
        ax.tick_params(axis="y", labelsize=8)
    for ax in list(axes.flat)[len(bases) :]:
        ax.axis("off")
    intervals = " with bootstrap intervals" if "car_ci_low" in ranking else ""
    fig.suptitle(f"Teachers ranked by Compatibility-Adjusted Reward{intervals} (best in red)", fontsize=11)
    fig.tight_layout()
    return _save(fig, _figure_path(out, "ranking"))


# where a point's label may go, tried in order: close first, then further out in eight directions (points)
_LABEL_OFFSETS = [(dx * r, dy * r) for r in (4, 9, 15, 22, 30, 40, 52) for dx, dy in
                  ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1.4), (0, -1.4))]  # fmt: skip


def text_box(annotation, renderer):  # noqa: ANN001, ANN201 - matplotlib objects
    """An annotation's text box in display units, without its leader line."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)  # an annotation places its text when drawn or measured
    return Text.get_window_extent(annotation, renderer)


def place_labels(ax, xs, ys, labels, obstacles=(), fontsize: float = 7) -> list:  # noqa: ANN001 - matplotlib
    """Labels each point (data coordinates) at the first offset of :data:`_LABEL_OFFSETS` where the label's text box
    stays inside the axes and overlaps no label placed before it, no point's marker and no box in ``obstacles``
    (display units); a label
    away from its point gets a thin leader line. Call it once the axes' limits and the layout are final.
    Returns the annotations (the last candidate is kept when every offset collides)."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    marker = 4.0 * ax.figure.dpi / 72  # half the marker's width, in display units
    points = ax.transData.transform(np.column_stack([xs, ys]))
    taken = [Bbox.from_extents(px - marker, py - marker, px + marker, py + marker) for px, py in points]
    taken += list(obstacles)
    placed = []
    for x, y, label in zip(xs, ys, labels):
        for i, (dx, dy) in enumerate(_LABEL_OFFSETS):
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            far = abs(dx) + abs(dy) > 12
            annotation = ax.annotate(
                label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=fontsize, ha=ha, va=va,
                arrowprops={"arrowstyle": "-", "color": "#999999", "lw": 0.5, "shrinkA": 0, "shrinkB": 3} if far else None,
            )  # fmt: skip
            box = text_box(annotation, renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (inside and not any(box.overlaps(other) for other in taken)) or i == len(_LABEL_OFFSETS) - 1:
                break
            annotation.remove()
        taken.append(box)
        placed.append(annotation)
    return placed


def reward_vs_loss_axes(ranking: pd.DataFrame):  # noqa: ANN201 - a matplotlib Figure
    """The reward-vs-loss figure (see :func:`reward_vs_loss_figure`), not yet saved: the tests read its labels."""
    import matplotlib.pyplot as plt

    bases = list(dict.fromkeys(ranking["base_model"]))
    rows, cols = _grid(len(bases))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    panels = []
    for ax, base in zip(axes.flat, bases):
        group = ranking[ranking["base_model"] == base]
        beta = float(group["car_beta"].iloc[0]) if "car_beta" in group else 3.0
        shift = float(group["car_reward_shift"].iloc[0]) if "car_reward_shift" in group else 0.0
        lo, hi = group["compat_loss"].min(), group["compat_loss"].max()
        pad = max((hi - lo) * 0.25, 0.05)
        losses = np.linspace(max(lo - pad, 0), hi + pad, 100)
        r_lo, r_hi = group["reward"].min(), group["reward"].max()
        # the view: the data with a margin, never narrower than 10% of the rewards' size, so that a small gap
        # between teachers does not fill the whole height
        r_pad = max((r_hi - r_lo) * 0.3, abs(r_hi) * 0.05, 1e-3)
        y_lo, y_hi = r_lo - r_pad, r_hi + r_pad
        levels = []
        for level in np.quantile(group["car"], [0.0, 0.5, 1.0]):
            line = level * (1 + beta * losses) - shift
            ax.plot(losses, line, color="#bbbbbb", lw=0.8, ls="--", zorder=1)
            inside = np.flatnonzero((line >= y_lo) & (line <= y_hi))
            if len(inside):  # the value where the line leaves the view, so that it is always readable
                levels.append((losses[inside[-1]], line[inside[-1]], level))
        ax.scatter(group["compat_loss"], group["reward"], s=40, color="#2e4057", zorder=2)
        ax.set_xlim(losses[0], losses[-1])
        ax.set_ylim(y_lo, y_hi)  # the data, not the iso-lines, sets the view
        ax.set_xlabel(f"compatibility loss of {short_name(base)} (lower is better)")
        ax.set_ylabel("mean reward (higher is better)")
        ax.set_title(f"base: {short_name(base)}  (beta={beta:g}; dashed: equal CAR)", fontsize=10)
        panels.append((ax, group, levels))
    for ax in list(axes.flat)[len(bases) :]:
        ax.axis("off")
    fig.tight_layout()  # before the labels: their placement is computed in the final layout
    renderer = fig.canvas.get_renderer()
    for ax, group, levels in panels:
        # below and left of where the line leaves the view (the top or the right edge): inside the axes
        iso = [ax.annotate(f"CAR={level:.3g}", (x, y), xytext=(-3, -2), textcoords="offset points", ha="right",
                           va="top", fontsize=6.5, color="#888888") for x, y, level in levels]  # fmt: skip
        place_labels(ax, group["compat_loss"].to_numpy(), group["reward"].to_numpy(),
                     [short_name(t) for t in group["teacher"]], [a.get_window_extent(renderer) for a in iso])  # fmt: skip
    return fig


def reward_vs_loss_figure(ranking: pd.DataFrame, out: Path) -> Path:
    """Mean reward against mean compatibility loss per teacher, with CAR iso-lines r = c (1 + beta L) labelled with
    their values, and teacher labels placed so that none covers another or a point."""
    return _save(reward_vs_loss_axes(ranking), _figure_path(out, "reward_vs_compat_loss"))


def correlation_figure(corr: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt

    from magpie_teach.scoring.confidence import rho_columns

    table = corr.drop(index=[i for i in corr.index if i == "n_teachers"])[rho_columns(corr)]
    fig, ax = plt.subplots(figsize=(1.1 * table.shape[1] + 2.5, 0.42 * table.shape[0] + 1.4))
    image = ax.imshow(table.to_numpy(dtype=float), cmap="RdBu", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(table.shape[1]), [short_name(c) for c in table.columns], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(table.shape[0]), [LABELS.get(m, m) for m in table.index], fontsize=8)
    for (i, j), value in np.ndenumerate(table.to_numpy(dtype=float)):
        if not np.isnan(value):
            ax.text(
                j,
                i,
                f"{value:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if abs(value) > 0.6 else "black",
            )
    fig.colorbar(image, ax=ax, label="Spearman rho with AP")
    ax.set_title("How well each metric ranks teachers (Spearman rho vs. fine-tuned performance)", fontsize=10)
    fig.tight_layout()
    return _save(fig, _figure_path(out, "metric_correlations"))


def paradox_figure(pairs: pd.DataFrame, out: Path) -> Path:
    import matplotlib.pyplot as plt

    counts = pairs.groupby(["family", "base_model"]).size().unstack(fill_value=0)
    fig, ax = plt.subplots(figsize=(1.0 * counts.shape[1] + 3, 0.45 * counts.shape[0] + 1.5))
    image = ax.imshow(counts.to_numpy(), cmap="Oranges", aspect="auto")
    ax.set_xticks(range(counts.shape[1]), [short_name(c) for c in counts.columns], rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(counts.shape[0]), counts.index, fontsize=8)
    for (i, j), value in np.ndenumerate(counts.to_numpy()):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="pairs where the larger teacher is worse")
    ax.set_title("Larger Models' Paradox: within-family pairs, per base model", fontsize=10)
    fig.tight_layout()
    return _save(fig, _figure_path(out, "paradox_pairs"))


def build_sections(config: ReportConfig, out: Path) -> list[Section]:
    from magpie_teach.scoring.metrics import correlations, load_performance
    from magpie_teach.scoring.paradox import find_paradox_pairs

    sections: list[Section] = []
    ranking = corr = None
    if config.rank_dir is not None:
        ranking, corr, summary = read_rank_folder(Path(config.rank_dir))
        ranking = ranking.sort_values(["base_model", "car"], ascending=[True, False], kind="stable")
        best = ranking.loc[ranking.groupby("base_model", sort=False)["car"].idxmax(), ["base_model", "teacher"]]
        text = (
            "Best teacher by CAR: "
            + "; ".join(f"**{short_name(b)}** -> {short_name(t)}" for b, t in best.itertuples(index=False))
            + "."
        )
        disagreement = metric_disagreement(ranking)
        if disagreement:
            text += " " + disagreement
        confidence = summary.get("confidence")
        if confidence:
            text += " " + " ".join(confidence.get("sentences", []))
            text += (
                f" Intervals: {confidence['level']:.0%} paired bootstrap over instructions ({confidence['replicates']} "
                "replicates); p_best is the probability that a teacher's true CAR is the highest (a hierarchical model "
                "that shrinks leads no larger than the noise, so a lucky leader is not taken at its word)."
            )
        sections.append(Section("Setup", setup_text(Path(config.rank_dir), ranking, summary)))
        table_columns = ["base_model", "teacher", "car", "car_ci_low", "car_ci_high", "p_best",
                         *[c for c in SHOWN_METRICS if c in ranking and c != "car"], "n"]  # fmt: skip
        table = ranking[[c for c in table_columns if c in ranking]]
        legend = (
            "Higher is better for car, p_best, reward, length and IFD; lower is better for compat_loss and PPL "
            "(the arrow in each header). The best value per base model is in bold."
        )
        sections.append(Section("Teacher ranking per base model", text + "\n\n" + legend,
                                ranking_figure(ranking, out), table))  # fmt: skip
        sections.append(Section(
            "Reward against compatibility",
            "Each point is a teacher. A teacher is a good fit when its responses score high with the reward model "
            "*and* are easy for the base model to learn (low loss). Dashed lines join points of equal CAR.",
            reward_vs_loss_figure(ranking, out),
        ))  # fmt: skip
        next_steps = [
            f"`magpie-teach select --scores {_shareable(config.rank_dir)} --base-model {short_name(b)} --output "
            f"sft-{slug(short_name(b))}` builds the SFT data of {short_name(t)} for {short_name(b)}."
            for b, t in best.itertuples(index=False)
        ]
        if config.performance is None:
            next_steps.append(
                "`--performance FILE` (benchmark results of students, e.g. the paper's Table 6) adds how well each "
                "metric predicts them (Spearman) and the Larger Models' Paradox pairs to this page."
            )
        sections.append(Section("What next", " ".join(next_steps)))
    performance = (load_performance(config.performance, config.performance_columns, config.aliases)
                   if config.performance else None)  # fmt: skip
    if performance is not None and ranking is not None and corr is None:
        corr = correlations(ranking, performance)
    if corr is not None:
        sections.append(Section(
            "Which metric predicts teacher quality",
            "Spearman rank correlation between each metric's teacher ranking and the ranking by performance after "
            "fine-tuning (AP), per base model, and the mean: the layout of Table 4 of the paper.",
            correlation_figure(corr, out), corr.reset_index().round(3),
        ))  # fmt: skip
    if performance is not None:
        shown = ["base_model", "teacher", "ap", *[c for c in ("win_rate",) if c in performance.columns]]
        best = performance.loc[performance.groupby("base_model", sort=False)["ap"].idxmax(), shown]
        text = (f"From `{_shareable(config.performance)}`: the teacher whose responses gave the highest AP "
                f"(mean of {', '.join(config.performance_columns)}).")  # fmt: skip
        if "win_rate" in best.columns:
            text += (" AP is not the raw win rate (shown beside it): where they disagree, the length-controlled "
                     "rate has removed what the judge gave for length.")  # fmt: skip
        sections.append(Section(
            "Best teacher per base model (measured)", text,
            table=best.rename(columns={"teacher": "best teacher", "ap": "AP", "win_rate": "raw win rate"}).round(2),
        ))  # fmt: skip
        try:
            pairs = find_paradox_pairs(performance, source=config.performance)
        except DataError:
            pairs = None
        if pairs is not None and len(pairs):
            sections.append(Section(
                "Larger Models' Paradox",
                f"{len(pairs)} within-family pairs where the larger teacher gives the lower AP.",
                paradox_figure(pairs, out),
                pairs.sort_values(["base_model", "gap"], ascending=[True, False]).round(2),
            ))  # fmt: skip
    if config.calibration is not None:
        sections.append(calibration_section(Path(config.calibration), out))
    if config.evaluation is not None:
        sections.append(evaluation_section(Path(config.evaluation), out))
    return sections


def metric_disagreement(ranking: pd.DataFrame) -> str:
    """The paper's point when it shows: the teacher reward alone would pick against the one CAR picks."""
    parts = []
    for base, group in ranking.groupby("base_model", sort=False):
        by_reward = group.loc[group["reward"].idxmax()]
        by_car = group.loc[group["car"].idxmax()]
        if by_reward["teacher"] != by_car["teacher"]:
            parts.append(
                f"For {short_name(base)}, reward alone would pick {short_name(by_reward['teacher'])} "
                f"(reward {by_reward['reward']:.4g}); CAR picks {short_name(by_car['teacher'])} "
                f"(reward {by_car['reward']:.4g}), because its responses are easier for {short_name(base)} to learn "
                f"(compatibility loss {by_car['compat_loss']:.4g} against {by_reward['compat_loss']:.4g})."
            )
    if not parts:
        return "Reward alone and CAR pick the same teacher for every base model here."
    return " ".join(parts)


def _shareable(path: str | Path) -> str:
    """A path as a reader of a shared page can use it: relative to the working folder when under it, else its name."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def setup_text(rank_dir: Path, ranking: pd.DataFrame, summary: dict) -> str:
    """What was ranked and how: teachers, reward, base models, CAR's settings, instructions, the command."""
    import json

    from magpie_teach.artefacts import COMMAND_FILE, recorded_rank_config

    recorded, _ = recorded_rank_config(str(rank_dir))
    recorded = recorded or {}
    teachers = ", ".join(short_name(t) for t in dict.fromkeys(ranking["teacher"]))
    bases = ", ".join(short_name(b) for b in dict.fromkeys(ranking["base_model"]))
    reward = (
        f"reward model {short_name(recorded['reward_model'])}" if recorded.get("reward_model")
        else f"reward column {recorded['reward_column']}" if recorded.get("reward_column") else "reward"
    )  # fmt: skip
    beta = float(ranking["car_beta"].iloc[0]) if "car_beta" in ranking else recorded.get("beta")
    shift = float(ranking["car_reward_shift"].iloc[0]) if "car_reward_shift" in ranking else 0.0
    n = sorted(set(ranking["n"].astype(int))) if "n" in ranking else []
    lines = [
        f"Teachers: {teachers}.",
        f"Base models: {bases}; {reward}.",
        f"CAR = (reward + {shift:g}) / (1 + beta x compatibility loss) with beta = {beta:g}.",
        "Responses scored per teacher and base model: " + ", ".join(map(str, n)) + "."
        + (f" Source: {short_name(summary['source'])}." if summary.get("source") else ""),
    ]  # fmt: skip
    command = rank_dir / COMMAND_FILE
    if command.exists():
        argv = json.loads(command.read_text()).get("argv", [])
        lines.append(
            f"Command: `magpie-teach {' '.join(_shareable(a) if Path(a).is_absolute() else a for a in argv)}`."
        )
    return " ".join(lines)


def calibration_section(folder: Path, out: Path) -> Section:
    """The section of a `calibrate` folder: what predicts AP best, CAR's fitted beta and where it is stable, the
    held-out figures, and the figure of mean rho against beta."""
    import json
    import shutil

    from magpie_teach.artefacts import CALIBRATION, CORRELATIONS
    from magpie_teach.artefacts import CALIBRATION_FIGURE as FIGURE

    try:
        result = json.loads((folder / CALIBRATION).read_text())
        table = pd.read_csv(folder / CORRELATIONS, index_col=0)
    except (OSError, ValueError) as err:
        raise DataError(f"--calibration {folder}: not a `calibrate` output folder ({err})") from None
    from magpie_teach.scoring.calibrate import choice_sentence, stable_range_text

    means, held = result["mean_rho"], result["held_out_mean_rho"]
    text = (
        f"Over {len(result['base_models'])} base model(s), **{result['best_metric']}** predicts AP best "
        f"(mean Spearman rho {means['best']:.3f}). CAR's best beta is {result['best_beta']:.4g}, the same order of "
        f"teachers for any beta in {stable_range_text(result)} (where the "
        f"fit is stable, not a confidence interval): mean rho {means['car_best_beta']:.3f}, against "
        f"{means['default']:.3f} at the default beta {result['default_beta']:g}. {choice_sentence(result)}"
    )
    if held.get("fitted") is not None:
        text += (
            f" Held out (each base model scored with the choice fitted on the others): mean rho {held['fitted']:.3f} "
            f"for the fitted choice, {held['default']:.3f} for the default."
        )
    figure = _figure_path(out, "calibration")
    shutil.copyfile(folder / FIGURE, figure)
    return Section("Which beta (calibration)", text, figure, table.reset_index().round(3))


EVALUATION_RATES = {"win_rate": "win rate", "lc_win_rate": "length-controlled", "bt_score": "Bradley-Terry"}


def evaluation_section(folder: Path, out: Path) -> Section:
    """The section of an `evaluate` folder: each student's win rates against the baseline with their bootstrap
    intervals (a table and a figure), and how many verdicts could not be read."""
    import matplotlib.pyplot as plt

    from magpie_teach.artefacts import verify_run

    verify_run(folder, "report")
    try:
        rates = pd.read_csv(folder / "win_rates.csv")
        judgements = pd.read_parquet(folder / "judgements.parquet", columns=["id", "student", "baseline", "parsed"])
    except (OSError, ValueError) as err:
        raise DataError(f"--evaluation {folder}: not an `evaluate` output folder ({err})") from None
    baseline = ", ".join(short_name(str(b)) for b in judgements["baseline"].unique())
    unread = int((~judgements["parsed"]).sum())
    text = (
        f"{len(rates)} student(s) against the baseline {baseline} on {judgements['id'].nunique()} prompts, "
        "each answer judged in both orders; win rates in %, with 95% bootstrap intervals over prompts. "
        f"{unread} of {len(judgements)} verdict(s) could not be read and are left out."
    )
    table = pd.DataFrame({"student": rates["student"].map(lambda v: short_name(str(v))), "n": rates["n"]})
    for column, label in EVALUATION_RATES.items():
        low, high = rates.get(f"{column}_low"), rates.get(f"{column}_high")
        table[label] = [
            "n/a" if pd.isna(v) else f"{v:.1f}" + ("" if low is None or pd.isna(lo) else f" [{lo:.1f}, {hi:.1f}]")
            for v, lo, hi in zip(rates[column], low if low is not None else rates[column], high if high is not None else rates[column])
        ]  # fmt: skip
    if "win_rate_low" in rates.columns:  # what the intervals let one say, student by student
        from magpie_teach.scoring.winrates import comparison

        said = [f"{short_name(str(r.student))} {comparison(r.win_rate_low, r.win_rate_high)} {baseline}"
                for r in rates.itertuples() if pd.notna(r.win_rate)]  # fmt: skip
        if said:
            text += " By the win rate's interval: " + "; ".join(said) + "."
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.45 * len(rates) * len(EVALUATION_RATES)))
    ys, labels = [], []
    for i, row in enumerate(rates.itertuples()):
        for j, (column, label) in enumerate(EVALUATION_RATES.items()):
            y = i * (len(EVALUATION_RATES) + 1) + j
            value = getattr(row, column)
            if pd.notna(value):
                low, high = getattr(row, f"{column}_low", value), getattr(row, f"{column}_high", value)
                ax.errorbar(value, y, xerr=[[value - low], [high - value]], fmt="o", color=f"C{j}", capsize=3)
            ys.append(y)
            labels.append(f"{short_name(str(row.student))}: {label}")
    ax.axvline(50, color="grey", linestyle=":", linewidth=1)
    ax.set_yticks(ys, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("% against the baseline (50: as good)")
    ax.set_title("Students against the baseline", fontsize=10)
    fig.tight_layout()
    figure = _save(fig, _figure_path(out, "evaluation"))
    return Section("How the students did (evaluate)", text, figure, table)


NAME_COLUMNS = ("base_model", "teacher", "best teacher", "smaller", "larger")


def _short_names(frame: pd.DataFrame) -> pd.DataFrame:
    """Model columns shown by their last path component (a local folder reads like its Hub name)."""
    return frame.assign(**{c: frame[c].map(lambda v: short_name(str(v))) for c in NAME_COLUMNS if c in frame})


DIRECTIONS = {**METRIC_DIRECTIONS, "p_best": True}
"""Metric -> higher is better: an arrow in each table header, and the best value per base model in bold."""


def _display(table: pd.DataFrame, bold: tuple[str, str]) -> pd.DataFrame:
    """A table's cells as text: numbers to 4 significant digits, model names short, the best value of each metric
    per base model wrapped in ``bold`` (a teacher ranking), a direction arrow in each metric's header."""
    shown = _short_names(table)
    ranked = {"teacher", "base_model"} <= set(table.columns) and table["teacher"].nunique() > 1
    cells = {}
    for column in shown.columns:
        values = shown[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            text = values.map(lambda v: "" if pd.isna(v) else f"{v:.4g}")
        else:
            text = values.map(lambda v: html.escape(str(v)) if bold[0] == "<b>" else str(v))
        if ranked and column in DIRECTIONS and pd.api.types.is_numeric_dtype(values):
            groups = table.groupby("base_model")[column]
            target = groups.transform("max") if DIRECTIONS[column] else groups.transform("min")
            text = text.where(table[column] != target, bold[0] + text + bold[1])
        name = short_name(str(column)) if "/" in str(column) else str(column)  # a base model's column: its name
        cells[f"{name} {'↑' if DIRECTIONS[column] else '↓'}" if column in DIRECTIONS else name] = text
    return pd.DataFrame(cells, index=shown.index)


def _inline_html(text: str) -> str:
    """The Markdown of a section's text as HTML: **bold**, *emphasis*, `code`."""
    import re

    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<em>\1</em>", text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return "</p><p>".join(text.split("\n\n"))


def render_markdown(title: str, sections: list[Section], out: Path) -> str:
    parts = [f"# {title}\n"]
    for section in sections:
        parts.append(f"## {section.title}\n")
        if section.text:
            parts.append(section.text + "\n")
        if section.figure is not None:
            parts.append(f"![{section.title}]({section.figure.relative_to(out).as_posix()})\n")
        if section.table is not None:
            parts.append(markdown_table(_display(section.table, ("**", "**"))) + "\n")
    parts.append(
        "Made with magpie-teach (Xu et al., *Stronger Models are Not Always Stronger Teachers for Instruction Tuning*, NAACL 2025).\n"
    )
    return "\n".join(parts)


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
img{max-width:100%;height:auto;display:block;margin:1em 0}table{border-collapse:collapse;font-size:.85em;margin:1em 0}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:right}th{background:#f4f4f4}td:first-child,td:nth-child(2){text-align:left}
footer{margin-top:3em;font-size:.8em;color:#777}"""


def render_html(title: str, sections: list[Section]) -> str:
    body = [f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        body.append(f"<section><h2>{html.escape(section.title)}</h2>")
        if section.text:
            body.append(f"<p>{_inline_html(section.text)}</p>")
        if section.figure is not None:
            data = base64.b64encode(section.figure.read_bytes()).decode()
            body.append(f'<img alt="{html.escape(section.title)}" src="data:image/png;base64,{data}">')
        if section.table is not None:
            body.append(_display(section.table, ("<b>", "</b>")).to_html(index=False, escape=False, border=0))
        body.append("</section>")
    body.append("<footer>Made with magpie-teach (Xu et al., NAACL 2025).</footer>")
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(body)}</body></html>")  # fmt: skip


@dataclass
class ReportResult:
    markdown: Path
    html: Path
    figures: list[Path]
    sections: list[str]


def report(config: ReportConfig) -> ReportResult:
    import matplotlib

    from magpie_teach.artefacts import REPORT_HTML, REPORT_MARKDOWN, RunOutputs, locked

    matplotlib.use("Agg")
    if all(x is None for x in (config.rank_dir, config.performance, config.calibration, config.evaluation)):
        raise ConfigError(  # before the output folder is made: a command without input leaves nothing behind
            "give a `rank` output folder, --performance FILE, --calibration DIR, --evaluation DIR, or several."
        )
    out = Path(config.output_dir)
    with locked(out):  # one run per folder; its manifest names this run's files, figures included
        files = RunOutputs(out, "report")
        sections = build_sections(config, out)
        markdown = render_markdown(config.title, sections, out)
        page = render_html(config.title, sections)
        files.write(REPORT_MARKDOWN, lambda tmp: Path(tmp).write_text(markdown, encoding="utf-8"))
        files.write(REPORT_HTML, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        figures = [s.figure for s in sections if s.figure is not None]
        for stale in set((out / "figures").glob("*.png")) - set(figures):  # an earlier report's figure
            stale.unlink()
        files.written.update(str(figure.relative_to(out)) for figure in figures)
        files.finish()
    return ReportResult(out / REPORT_MARKDOWN, out / REPORT_HTML, figures, [s.title for s in sections])
