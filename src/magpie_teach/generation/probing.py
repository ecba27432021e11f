"""`magpie-teach probe`: a budgeted teacher search that stops generating for teachers that have lost.

Two ways to feed the rounds of :func:`magpie_teach.scoring.probe.run_probe`:

* ``probe CONFIG``: a `generate` YAML with a ``scoring:`` and a ``probe:`` block. Each round generates the next
  instructions for the teachers still in the race, through `generate`'s own pipeline and response store
  (OUTPUT/store: nothing is generated twice, and a later `generate` of the same YAML reuses it), and scores them
  with `rank`'s engine;
* ``probe --replay DATA``: responses already generated (long or Generator-Zoo layout) are revealed in the same
  rounds, to measure what a probe would have spent.

Revealed responses are scored through the content-keyed score cache, `rank`'s (``--cache-dir``): a killed probe
resumes without scoring again, and a `rank` of the same data and models after a probe (or a probe after a `rank`)
scores nothing twice; ``probe_summary.json``'s ``work`` counts, per stage, what was scored and what was read. Outputs: ``probe_summary.json``, ``probe_rounds.csv``, and OUTPUT/rank, a `rank`-layout folder of
every response the probe scored (a teacher eliminated early has fewer instructions: its ``n``), which `report`,
`select` and `push` read.
"""

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from magpie_teach import artefacts
from magpie_teach.errors import ConfigError, MagpieTeachError
from magpie_teach.generation.config import ReplayConfig
from magpie_teach.scoring.probe import ProbeResult, round_sizes, run_probe
from magpie_teach.settings import CARSettings, ProbeSettings, ScoringRunSettings

if TYPE_CHECKING:
    from magpie_teach.generation.config import GenerateConfig
    from magpie_teach.ranking.rank import RankConfig
    from magpie_teach.scoring.executor import ScoringSession

logger = logging.getLogger(__name__)

RULE = (
    "Bonferroni over the (teachers - 1) comparisons with the leader in each planned round: a one-sided z test on "
    "the paired bootstrap's standard error of the lead, at level (1 - confidence) / ((teachers - 1) * rounds)"
)


def scored(rank_config: "RankConfig", session: "ScoringSession", work: dict) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The probe's scorer of revealed responses: the scoring executor's (:func:`magpie_teach.scoring.executor.score_rows`), through
    the score cache, so a rerun, a `rank` of the same data and models, or a probe after a `rank` scores nothing
    again; SESSION keeps a model loaded from one round to the next when nothing else needs scoring between them;
    WORK counts, per stage, the examples scored and read from the cache."""
    from magpie_teach.scoring.executor import score_rows

    def scores(rows: pd.DataFrame) -> pd.DataFrame:
        return score_rows(rank_config, rows.reset_index(drop=True), work, session)

    return scores


def _with_generation_index(rows: pd.DataFrame) -> pd.DataFrame:
    return rows if "generation_index" in rows.columns else rows.assign(generation_index=0)


class _Progress:
    """One line per round: the round, the survivors and the spend (on a terminal and in a log alike)."""

    def __init__(self, n_teachers: int, sizes: list[int], full: int, generations: dict[str, int]):
        self.n_teachers, self.sizes, self.full, self.generations = n_teachers, sizes, full, generations
        self.start = time.monotonic()

    def __call__(self, k: int, size: int, survivors: list[str], revealed: dict[str, int]) -> None:
        used = sum(n * self.generations.get(t, 1) for t, n in revealed.items())
        elapsed = time.monotonic() - self.start
        race = (
            f"{len(survivors)} of {self.n_teachers} teachers still in the race"
            + (f": {', '.join(survivors)}" if len(survivors) <= 6 else "")
            if survivors
            else "every base model decided"
        )
        print(
            f"round {k}/{len(self.sizes)}: {size} instructions; {race}; {used:,} of {self.full:,} responses "
            f"({used / self.full:.1%} of the grid); {elapsed:.0f} s",
            flush=True,
        )


def _write_outputs(
    out: Path,
    result: ProbeResult,
    rank_config: "RankConfig",
    settings: ProbeSettings,
    generations: dict[str, int],
    tokens: dict[str, int],
    source: str,
    n_available: int,
    failed: dict[str, int] | None = None,
    work: dict | None = None,
) -> dict:
    from magpie_teach.data import LoadedResponses
    from magpie_teach.ranking.rank import write_rank_outputs

    teachers = list(result.revealed)
    budget = result.sizes[-1]
    used = sum(n * generations.get(t, 1) for t, n in result.revealed.items())
    full = sum(budget * generations.get(t, 1) for t in teachers)
    summary = {
        "decisions": result.decisions,
        "responses_used": used,
        "responses_full": full,
        "share_of_full_grid": used / full if full else float("nan"),
        "instructions_per_teacher": result.revealed,
        "failed_generations": failed or {},
        "tokens_generated": tokens,
        "rounds_planned": len(result.sizes),
        "rounds_run": result.finished_round,
        "round_sizes": result.sizes,
        "stopped_because": result.stop_reason,
        "instructions_available": n_available,
        "work": work or {},
        "rule": RULE,
        "elimination_z": result.z,
        "settings": dataclasses.asdict(settings),
        "source": source,
    }
    files = artefacts.RunOutputs(out, "probe")
    files.write(artefacts.PROBE_ROUNDS, lambda tmp: result.rounds.to_csv(tmp, index=False))
    scores = result.scores
    loaded = LoadedResponses(scores.drop_duplicates(["teacher", "id", "generation_index"]), pd.DataFrame(), source)
    counts = {"rows_scored": int(len(scores) // max(len(rank_config.base_models), 1))}
    write_rank_outputs(rank_config, scores, loaded, counts)
    files.write(artefacts.PROBE_SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, default=str)))
    files.finish()
    return summary


def _replay_rank_config(config: ReplayConfig) -> "RankConfig":
    from magpie_teach.ranking.rank import RankConfig

    shared = {
        f.name: getattr(config, f.name) for cls in (CARSettings, ScoringRunSettings) for f in dataclasses.fields(cls)
    }
    shared["base_models"] = list(config.base_models)
    return RankConfig(
        data=config.replay, output_dir=str(Path(config.output_dir) / artefacts.PROBE_RANK), revision=config.revision,
        split=config.split, teachers=list(config.teachers), drop_invalid=config.drop_invalid,
        bootstrap=config.bootstrap, confidence=config.confidence, bootstrap_seed=config.seed, **shared,
    )  # fmt: skip


def plan_text(sizes: list[int], teachers: dict[str, int], max_new_tokens: dict[str, int] | None = None) -> list[str]:
    """The budget in advance: generations (and a token bound) of the full grid and of the probe's first rounds."""
    full = sum(sizes[-1] * g for g in teachers.values())

    def tokens(n: int) -> str:
        if not max_new_tokens:
            return ""
        bound = sum(n * g * max_new_tokens[t] for t, g in teachers.items())
        return f", at most {bound:,} generated tokens"

    lines = [
        f"full grid: {len(teachers)} teachers x {sizes[-1]:,} instructions = {full:,} generations{tokens(sizes[-1])}"
    ]
    previous = 0
    for k, size in enumerate(sizes[:3], start=1):
        new = sum((size - previous) * g for g in teachers.values())
        lines.append(
            f"probe round {k}/{len(sizes)}: {size:,} instructions; at most {new:,} new generations if every teacher is "
            f"still in the race{tokens(size - previous)}"
        )
        previous = size
    return lines


def probe_replay(config: ReplayConfig, dry_run: bool = False) -> dict:
    """Replays responses already generated in the probe's rounds; returns ``probe_summary.json``'s content."""
    from magpie_teach.data import load_responses

    loaded = load_responses(config.replay, revision=config.revision, split=config.split,
                            reward_column=config.reward_column, drop_invalid=config.drop_invalid,
                            teachers=config.teachers or None)  # fmt: skip
    rows = _with_generation_index(loaded.rows)
    teachers = list(dict.fromkeys(rows["teacher"]))
    ids = list(pd.unique(rows["id"]))
    sizes = round_sizes(len(ids), config)
    generations = rows.groupby("teacher")[["id"]].size().floordiv(len(ids)).clip(lower=1).to_dict()
    if dry_run:
        return {"plan": plan_text(sizes, generations), "sizes": sizes}
    from magpie_teach.ranking.rank import locate_models
    from magpie_teach.scoring.executor import ScoringSession

    rank_config = _replay_rank_config(config)
    locate_models(rank_config)  # every model located before the first loads
    out = Path(config.output_dir)
    with artefacts.locked(out), ScoringSession(rank_config.output_dir) as session:
        if rank_config.ray_address:
            from magpie_teach.scoring.on_ray import check_cluster

            Path(rank_config.output_dir).mkdir(parents=True, exist_ok=True)
            rank_config.ray_address = check_cluster(rank_config.ray_address, rank_config.output_dir,
                                                    rank_config.gpus_per_worker, rank_config.num_workers)  # fmt: skip
        work: dict = {}
        score = scored(rank_config, session, work)
        indexed = rows.set_index(["teacher", "id"]).sort_index()

        def reveal(who: list[str], new: list) -> pd.DataFrame:
            wanted = indexed.loc[indexed.index.isin(pd.MultiIndex.from_product([who, new]))].reset_index()
            return score(wanted)

        full = sum(sizes[-1] * generations.get(t, 1) for t in teachers)
        result = run_probe(ids, teachers, list(config.base_models), reveal, config, config.beta, config.reward_shift,
                           on_round=_Progress(len(teachers), sizes, full, generations))  # fmt: skip
        used = rows.merge(result.scores[["teacher", "id", "generation_index"]].drop_duplicates(), how="inner")
        tokens = used.groupby("teacher")["n_tokens"].sum().astype(int).to_dict() if "n_tokens" in used else {}
        return _write_outputs(out, result, rank_config, config, generations, tokens, config.replay, len(ids),
                              work=work)  # fmt: skip


def probe_generate(config: "GenerateConfig", overrides: dict[str, Any] | None = None, dry_run: bool = False) -> dict:
    """The probe of a `generate` YAML with ``scoring:`` and ``probe:`` blocks (``overrides``: flags given)."""
    from magpie_teach.generation.config import locate_models
    from magpie_teach.generation.run import GeneratePlan, load_instructions, response_store, run_pipeline
    from magpie_teach.generation.score_stage import rank_config as scoring_rank_config

    if config.scoring is None:
        raise ConfigError("probe: the config needs a scoring: block (reward_model and base_models)")
    if config.routing is not None:
        raise ConfigError("probe: every teacher in the race answers each round's instructions; remove the routing: "
                          "block (it is for the `generate` after `route`)")  # fmt: skip
    locate_models(config)
    settings = dataclasses.replace(config.probe or ProbeSettings(), **(overrides or {}))
    settings.validate()
    if config.instructions.magpie is not None:
        raise ConfigError("probe: instructions must come from a file or Hub data set (generate Magpie ones first)")
    instructions, counts = load_instructions(config)
    ids = list(instructions["id"])
    sizes = round_sizes(len(ids), settings)
    generations = {t.name: t.num_generations for t in config.teachers}
    if dry_run:
        caps = {t.name: t.sampling.max_new_tokens for t in config.teachers}
        return {"plan": plan_text(sizes, generations, caps), "sizes": sizes}
    from magpie_teach.processes import reap_descendants
    from magpie_teach.steps.pipelines import cuda_initialised

    out = Path(config.output_dir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(artefacts.locked(out))
        stack.enter_context(reap_descendants())
        rank_config = dataclasses.replace(
            scoring_rank_config(config), output_dir=str(out / artefacts.PROBE_RANK), bootstrap=settings.bootstrap,
            confidence=settings.confidence, bootstrap_seed=settings.seed,
        )  # fmt: skip
        from magpie_teach.scoring.executor import ScoringSession

        session = stack.enter_context(ScoringSession(rank_config.output_dir))
        work: dict = {}
        score = scored(rank_config, session, work)
        responses = response_store(config)
        by_id = instructions.set_index("id", drop=False)
        failed: dict[str, int] = {}

        def reveal(who: list[str], new: list) -> pd.DataFrame:
            wanted = by_id.loc[new].reset_index(drop=True)
            todo = {t.name: (wanted[~wanted["id"].isin(responses.done_ids(t.name))] if t.name in who
                             else wanted.iloc[:0]) for t in config.teachers}  # fmt: skip
            batch_plan = GeneratePlan(wanted, counts, {n: len(r) for n, r in todo.items()}, todo)
            if any(batch_plan.remaining.values()) and cuda_initialised():
                session.release()  # the scoring model leaves the GPU to this round's teachers
            failure = run_pipeline(config, batch_plan)
            rows = responses.read()
            rows = rows[rows["teacher"].isin(who) & rows["id"].isin(new)]
            missing = {t: len(new) * generations[t] - int((rows["teacher"] == t).sum()) for t in who}
            missing = {t: n for t, n in missing.items() if n}
            if missing or failure:
                raise MagpieTeachError(
                    f"probe: generation left rows missing {missing}: {failure or 'a pipeline step failed'}; finished "
                    f"batches are kept in {out / 'store'}, and rerunning the same command resumes"
                )
            bad = rows["status"] != "ok"
            for teacher, n in rows.loc[bad, "teacher"].value_counts().items():
                failed[str(teacher)] = failed.get(str(teacher), 0) + int(n)
            rows = rows[~bad].merge(wanted.drop(columns=["instruction"], errors="ignore"), on="id", how="left")
            return score(_with_generation_index(rows))

        teachers = [t.name for t in config.teachers]
        full = sum(sizes[-1] * g for g in generations.values())
        result = run_probe(ids, teachers, list(config.scoring.base_models), reveal, settings, config.scoring.beta,
                           config.scoring.reward_shift, on_round=_Progress(len(teachers), sizes, full, generations))  # fmt: skip
        stored = responses.read()
        used = stored.merge(result.scores[["teacher", "id", "generation_index"]].drop_duplicates(), how="inner")
        tokens = used.groupby("teacher")["n_tokens"].sum().astype(int).to_dict()
        return _write_outputs(out, result, rank_config, settings, generations, tokens, str(config.instructions.path),
                              len(ids), failed, work)  # fmt: skip


def describe(summary: dict) -> list[str]:
    """What a user reads at the end: the decision per base model and the spend."""
    lines = []
    for decision in summary["decisions"]:
        state = "decided" if decision["decided"] else "not decided"
        lines.append(
            f"{decision['base_model']}: {decision['teacher']} ({state}: {decision['reason']}; p_best "
            f"{decision['confidence']:.2f}; candidates left: {', '.join(decision['candidates'])})"
        )
    share = summary["share_of_full_grid"]
    lines.append(
        f"spent {summary['responses_used']:,} of {summary['responses_full']:,} responses "
        f"({share:.1%} of the full grid) in {summary['rounds_run']} of {summary['rounds_planned']} rounds; "
        f"stopped: {summary['stopped_because']}"
    )
    if math.isfinite(share) and summary.get("tokens_generated"):
        lines.append("tokens per teacher: " + ", ".join(f"{t} {n:,}" for t, n in summary["tokens_generated"].items()))
    return lines
