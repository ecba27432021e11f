"""`magpie-teach validate`: does CAR rank teachers the way fine-tuning does, on your own setup?

For one base model and its scored teachers: hold out some instructions, fine-tune one student per
teacher on that teacher's responses to the rest (a small budget, from a recipe), let every student
answer the same held-out instructions, score the answers (the reward model's mean score of the
students' generations with ``--reward-model``; with ``--judge`` or ``--judge-reward-model``, `evaluate`'s
win rates against ``--baseline``, AP being the mean of the length-controlled win rate and the
Bradley-Terry score), and report Spearman rho between each metric's teacher
ranking and the students' ranking, exactly as ``rank --performance`` does.

With ``--performance FILE`` (imported benchmark results, e.g. AlpacaEval 2 / Arena-Hard per
teacher and base model) the fine-tuning loop is skipped and those numbers are the students' scores.

Every stage keeps its output under ``OUTPUT``, so a rerun resumes: finished students are not
trained again, finished generations not regenerated.
"""

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.artefacts import RANKING, slug
from magpie_teach.errors import ConfigError
from magpie_teach.settings import AliasSettings, JudgeSettings, PerformanceSettings, RecordedCARSettings

logger = logging.getLogger(__name__)


@dataclass
class ValidateConfig(RecordedCARSettings, JudgeSettings, PerformanceSettings, AliasSettings):
    """`validate`'s settings; CAR's ``beta`` and ``reward_shift`` default to the ones `rank` recorded with the
    scores (:class:`magpie_teach.settings.RecordedCARSettings`); ``--judge`` (or ``--judge-reward-model``) and
    ``--baseline`` are `evaluate`'s (:class:`magpie_teach.settings.JudgeSettings`)."""

    scores: str = field(metadata={"help": "A `rank` output folder or its scores.parquet."})
    output_dir: str = field(
        metadata={"help": "Where students, generations and correlations are written.", "flag": "--output"}
    )
    base_model: str | None = field(
        default=None, metadata={"help": "The base model to fine-tune (needed when the scores hold several)."}
    )
    recipe: str = field(
        default="recipes/tiny/sft/config_cpu.yaml",
        metadata={"help": "SFT recipe for each student (its model and data are set here)."},
    )
    recipe_overrides: list[str] = field(
        default_factory=list,
        metadata={"help": "Recipe override as key=value (e.g. max_steps=20); repeat.", "flag": "--set"},
    )
    teachers: list[str] = field(
        default_factory=list, metadata={"help": "Teachers to validate; repeat (default: all).", "flag": "--teacher"}
    )
    eval_size: int = field(
        default=8, metadata={"help": "Instructions held out from training and answered by every student."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the held-out draw."})
    reward_model: str | None = field(
        default=None, metadata={"help": "Reward model that scores the students' answers."}
    )
    performance: str | None = field(
        default=None,
        metadata={
            "help": "Imported benchmark results instead of fine-tuning (teacher, base_model, benchmark columns)."
        },
    )
    max_new_tokens: int = field(default=64, metadata={"help": "Generation length of the students' answers (greedy)."})
    device: str = field(default="auto", metadata={"help": "Device for generation and reward scoring."})

    def __post_init__(self) -> None:
        judged = self.judge is not None or self.judge_reward_model is not None
        if self.performance is None and self.reward_model is None and not judged:
            raise ConfigError(
                "give --judge or --judge-reward-model with --baseline (win rates against a baseline), --reward-model "
                "(the mean reward of the students' answers) or --performance (imported results)"
            )
        if judged:
            self.check_judge()
        if self.eval_size < 1:
            raise ConfigError(f"--eval-size must be >= 1, got {self.eval_size}")
        self.check_car()


@dataclass
class ValidateResult:
    students: pd.DataFrame
    correlations: pd.DataFrame
    output_dir: Path


def _train_student(config: ValidateConfig, teacher: str, base: str, heldout: list[str], out: Path) -> Path:
    from magpie_teach.selection.select import SelectConfig, select
    from magpie_teach.training.sft import parse_recipe, train

    student = out / "students" / slug(teacher)
    if (student / "config.json").exists() and (student / "model.safetensors").exists():
        return student
    data = out / "data" / slug(teacher)
    select(
        SelectConfig(scores=config.scores, output_dir=str(data), base_model=base, teacher=teacher, exclude_ids=heldout)
    )
    overrides = []
    for item in config.recipe_overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value")
        overrides += [f"--{key}", value]
    overrides += ["--model_name_or_path", base, "--dataset_name", str(data), "--output_dir", str(student)]
    train(*parse_recipe(config.recipe, overrides))
    for checkpoint in student.glob("checkpoint-*"):  # optimizer states for resuming: evaluation reads the model only
        shutil.rmtree(checkpoint)
    return student


def _judge(config: ValidateConfig, prompts: pd.DataFrame, rows: list[dict], files: Any) -> None:
    """`evaluate`'s judging of the students' answers against the baseline's: each row gains its win rates and
    ``ap``, the mean of the length-controlled win rate and the Bradley-Terry score; the judgements and win rates
    are written through FILES (the run's :class:`~magpie_teach.artefacts.RunOutputs`) as `evaluate` writes them."""
    from magpie_teach.artefacts import JUDGEMENTS, WIN_RATES
    from magpie_teach.evaluation import evaluate as ev
    from magpie_teach.scoring.cache import default_cache_dir

    cache_root = default_cache_dir()
    if config.baseline_answers:
        baseline = ev.read_baseline_answers(config.baseline_answers, prompts)
    else:
        baseline = ev.generate_answers(config.baseline, prompts["instruction"].tolist(), config.max_new_tokens,
                                       device=config.device)  # fmt: skip
    judge = ev.build_judge(config, config.device, "auto", 8, cache_root)  # bfloat16 on a GPU, float32 on the CPU
    answers = {row["teacher"]: row.pop("answers") for row in rows}
    judgements = ev.judge_students(judge, prompts, answers, baseline, cache_root)
    rates = ev.summarise(judgements, 1000, 0.95, config.seed).set_index("student")
    for row in rows:
        rate = rates.loc[row["teacher"]]
        row.update(win_rate=rate["win_rate"], AE2_LC_WR=rate["lc_win_rate"], ArenaHard_WR=rate["bt_score"],
                   n_unparseable=int(rate["n_unparseable"]))  # fmt: skip
        row["ap"] = float(np.mean([rate["lc_win_rate"], rate["bt_score"]]))
    files.write(JUDGEMENTS, lambda tmp: judgements.to_parquet(tmp, index=False))
    files.write(WIN_RATES, lambda tmp: rates.to_csv(tmp))


def validate(config: ValidateConfig) -> ValidateResult:
    """Fine-tunes a student per teacher (or reads imported results) and correlates metrics with the students' scores.
    One run per output folder (locked); its manifest names this run's files; students, their data and answers are
    kept between runs (a rerun resumes from them)."""
    from magpie_teach.artefacts import locked

    with locked(config.output_dir):
        return _validate(config)


def _validate(config: ValidateConfig) -> ValidateResult:
    from magpie_teach.artefacts import (
        CORRELATIONS,
        STUDENTS,
        RunOutputs,
        load_scores,
        recorded_rank_config,
        write_atomic,
    )
    from magpie_teach.evaluation.evaluate import generate_answers
    from magpie_teach.modeling import load_model, load_tokenizer
    from magpie_teach.scoring.metrics import aggregate, correlations, load_performance
    from magpie_teach.scoring.reward import score_reward

    out = Path(config.output_dir)
    files = RunOutputs(out, "validate")
    scores = load_scores(config.scores, config.base_model)
    base = str(scores["base_model"].iloc[0])
    teachers = config.teachers or sorted(scores["teacher"].unique())
    unknown = sorted(set(teachers) - set(scores["teacher"]))
    if unknown:
        raise ConfigError(f"teacher(s) {unknown} are not in {config.scores}")
    if len(teachers) < 3:
        raise ConfigError(f"a rank correlation needs at least 3 teachers, got {teachers}")
    scores = scores[scores["teacher"].isin(teachers)]
    car = config.car(*recorded_rank_config(config.scores))
    logger.info("validate: %s", car.describe())
    ranking = aggregate(scores, beta=car.beta, reward_shift=car.reward_shift)

    if config.performance:
        performance = load_performance(config.performance, config.performance_columns, config.aliases)
        students = performance[["teacher", "base_model", "ap"]]
    else:
        ids = np.array(sorted(scores["id"].unique()))
        if config.eval_size >= len(ids):
            raise ConfigError(f"--eval-size {config.eval_size} leaves no training data ({len(ids)} instructions)")
        heldout = sorted(np.random.default_rng(config.seed).choice(ids, size=config.eval_size, replace=False).tolist())
        prompts = scores.drop_duplicates("id").set_index("id").loc[heldout, "instruction"].tolist()
        rows = []
        for teacher in teachers:
            student = _train_student(config, teacher, base, heldout, out)
            path = out / "generations" / f"{slug(teacher)}.parquet"
            if path.exists():
                answers = pd.read_parquet(path)["response"].tolist()
            else:
                answers = generate_answers(str(student), prompts, config.max_new_tokens, device=config.device)
                frame = pd.DataFrame({"id": heldout, "instruction": prompts, "teacher": teacher, "response": answers})
                write_atomic(path, lambda tmp, frame=frame: frame.to_parquet(tmp, index=False))
            rows.append({"teacher": teacher, "base_model": base, "student": str(student), "answers": answers})
        if config.judge is not None or config.judge_reward_model is not None:
            _judge(config, pd.DataFrame({"id": heldout, "instruction": prompts}), rows, files)
        else:
            tokenizer = load_tokenizer(config.reward_model)
            model = load_model(config.reward_model, "reward", "auto", config.device)  # bfloat16 on a GPU
            for row in rows:
                answers = [a if a.strip() else "(empty)" for a in row.pop("answers")]
                rewards, _ = score_reward(model, tokenizer, prompts, answers, show_progress=False)
                row["ap"] = float(np.mean(rewards))
        students = pd.DataFrame(rows)
    corr = correlations(ranking, students)
    files.write(STUDENTS, lambda tmp: students.to_csv(tmp, index=False))
    files.write(CORRELATIONS, lambda tmp: corr.to_csv(tmp))
    files.write(RANKING, lambda tmp: ranking.to_csv(tmp, index=False))
    files.finish()
    return ValidateResult(students, corr, out)
