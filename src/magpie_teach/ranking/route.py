"""`magpie-teach route`: learn, per base model, which teacher to send each instruction to, and measure what
routing would have given. The engine (the target, the ridge head, the cross-fitted fall-back, the replay) is
:mod:`magpie_teach.scoring.route`; the features are the base model's own (:mod:`magpie_teach.scoring.features`),
computed by the scoring executor through the score cache like every score.

Two ways in:

* ``route --scores RANK_DIR``: scores of instructions that every teacher answered (a `rank` folder, or a probe's
  ``OUTPUT/rank``): the router is trained on all of them, and whether it beats the single best teacher is decided
  by cross-fitting on them (held out fold by fold);
* ``route --replay DATA``: responses where every teacher answered every instruction (long or Zoo layout), scored
  here: ``--seed-instructions N`` of them (drawn with ``--seed``) train the router, the rest are held out and
  scored under the single best teacher, the routed choice and the per-instruction oracle.

The output folder is a ``router`` artefact: ``router.parquet`` (the head's weights per base model and teacher),
``route_summary.json`` (per base model the decision, its interval and the held-out figures, and the training
data's provenance), ``route_targets.parquet`` (the targets it learnt from) and ``route_config.yaml``. `generate`'s
``routing:`` block and `select --strategy routed` read it (:func:`magpie_teach.scoring.routing.assignments`); `push`
publishes it with a card.
"""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach import artefacts
from magpie_teach.errors import ConfigError, DataError
from magpie_teach.scoring.routing import router_rows
from magpie_teach.settings import (
    DEFAULT_BETA,
    DEFAULT_REWARD_SHIFT,
    CARChoice,
    RecordedCARSettings,
    ReplaySettings,
    ScoringRunSettings,
)

logger = logging.getLogger(__name__)

DEFAULT_SEED_INSTRUCTIONS = 100


@dataclass
class RouteConfig(RecordedCARSettings, ScoringRunSettings, ReplaySettings):
    """`route`'s settings: the scores or the replayed data (``--replay``: train on ``--seed-instructions`` of them,
    measure on the rest), the seed, the fall-back's confidence; the models, the model run, the cluster and the score
    cache are the scoring run's (with ``--scores``, the base model is one of the scores' and no reward model runs)."""

    output_dir: str = field(metadata={"help": "Folder for the router (router.parquet, route_summary.json, ...).",
                                      "flag": "--output"})  # fmt: skip
    scores: str | None = field(
        default=None,
        metadata={"help": "A `rank` output folder (or a probe's output folder) whose instructions every teacher "
                  "answered: the router learns from all of them."},
    )  # fmt: skip
    seed_instructions: int = field(
        default=DEFAULT_SEED_INSTRUCTIONS,
        metadata={"help": "--replay: instructions every teacher answers, that train the router (the rest are held "
                  "out); at least 10."},
    )  # fmt: skip
    seed: int = field(default=0, metadata={"help": "Seed of the seed draw, the folds and the bootstrap."})
    confidence: float = field(
        default=0.95,
        metadata={"help": "Routing is used only when the cross-fitted gain's interval at this level lies above 0."},
    )

    def __post_init__(self) -> None:
        if (self.scores is None) == (self.replay is None):
            raise ConfigError("give exactly one of --scores RANK_DIR (learn a router) and --replay DATA (measure one)")
        if self.replay is not None:
            self.check_models()
        else:
            if self.reward_model or self.reward_column:
                raise ConfigError("--scores: the rewards are the scores' own; --reward-model and --reward-column "
                                  "apply to --replay")  # fmt: skip
            if len(self.base_models) > 1:
                raise ConfigError(f"--scores: one --base-model at a time (got {self.base_models})")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence must be in (0, 1), got {self.confidence}")
        self.check_car()
        self.check_run()
        self.check_cluster()


# ---- the verb ---------------------------------------------------------------------------------------------------


def _shift(scores: pd.DataFrame, reward_shift: str) -> float:
    from magpie_teach.scoring.metrics import resolve_reward_shift

    return resolve_reward_shift(scores.groupby("teacher")["reward"].mean(), reward_shift)


def full_grid(scores: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The rows of the instructions that every teacher of SCORES answered (a probe's later rounds leave out the
    teachers it eliminated), and how many instructions were left out for that."""
    teachers = scores["teacher"].nunique()
    answered = scores.groupby("id")["teacher"].nunique()
    full = answered.index[answered == teachers]
    return scores[scores["id"].isin(full)], int(len(answered) - len(full))


def _features(config: RouteConfig, base: str, instructions: pd.DataFrame, work: dict, session: Any) -> pd.DataFrame:
    from magpie_teach.scoring.executor import instruction_features
    from magpie_teach.scoring.features import COLUMNS

    features = instruction_features(config, base, instructions, work, session)
    return features.set_index("id")[COLUMNS]


def _entry(base: str, decision: Any, teachers: list[str], n: int, shift: float, penalty: float) -> dict:
    return {
        "base_model": base, "teachers": teachers, "single_teacher": decision.single_teacher,
        "routed": decision.routed, "decision": decision.sentence(), "gain": decision.gain,
        "gain_interval": list(decision.gain_interval), "confidence": decision.confidence, "n_seed": n,
        "reward_shift": shift, "penalty": penalty,
    }  # fmt: skip


def _learn(config: RouteConfig, session: Any, work: dict) -> tuple[list[dict], list[pd.DataFrame], list, dict]:
    """``--scores``: the router of one base model, trained on every instruction all teachers answered."""
    from magpie_teach.scoring.route import FOLDS, decide, example_targets, fit_router

    scores = config.scores
    if (Path(scores) / artefacts.PROBE_SUMMARY).exists():  # a probe's folder: its rank-layout folder of scores
        scores = str(Path(scores) / artefacts.PROBE_RANK)
    source = artefacts.open_scores(scores, config.base_models[0] if config.base_models else None, config.revision)
    keys = source.keys()
    if config.teachers:
        absent = sorted(set(config.teachers) - set(keys["teacher"]))
        if absent:
            raise ConfigError(f"--teacher {absent}: not in {source.name} (it has {sorted(keys['teacher'].unique())})")
        keys = keys[keys["teacher"].isin(config.teachers)]
    keys = keys[keys["status"] == "ok"] if "status" in keys.columns else keys
    keys, left_out = full_grid(keys)
    n = keys["id"].nunique()
    if n < 2 * FOLDS:
        raise DataError(f"{source.name}: {n} instructions were answered by every teacher ({left_out} were not): "
                        f"routing learns from at least {2 * FOLDS}; score more (a probe's teachers all answer its first "
                        "round: raise probe.start), or keep fewer teachers (--teacher)")  # fmt: skip
    if left_out:
        logger.warning("%s: %d instructions not answered by every teacher are left out; the router learns from the "
                       "%d that were", source.name, left_out, n)  # fmt: skip
    recorded, where = artefacts.recorded_rank_config(scores, source.revision)
    car = config.car(recorded, where)
    shift = _shift(keys, car.reward_shift)
    targets = example_targets(keys, car.beta, shift)
    features = _features(config, source.base_model, source.instructions(keys), work, session).loc[targets.index]
    teachers = list(targets.columns)
    values = targets.to_numpy(float)
    decision = decide(features.to_numpy(), values, teachers, config.seed, config.confidence)
    router = fit_router(features.to_numpy(), values, teachers, config.seed)
    entry = _entry(source.base_model, decision, teachers, n, shift, router.penalty)
    entry.update(beta=car.beta, car_source=car.describe(), instructions_not_full_grid=left_out)
    long = targets.stack().rename("target").reset_index().assign(base_model=source.base_model, role="train")
    provenance = {"scores": source.name, "revision": source.revision}
    return [entry], [router_rows(source.base_model, router, decision, values.mean(axis=0))], [long], provenance


def _replay(config: RouteConfig, session: Any, work: dict) -> tuple[list[dict], list[pd.DataFrame], list, dict]:
    """``--replay``: score every response, then per base model train on the seed and measure on the rest."""
    from magpie_teach.data import load_responses
    from magpie_teach.ranking.rank import locate_models
    from magpie_teach.scoring.executor import score_rows
    from magpie_teach.scoring.route import check_seed, example_targets, replay, seed_rows

    locate_models(config)
    loaded = load_responses(config.replay, revision=config.revision, split=config.split,
                            reward_column=config.reward_column, drop_invalid=config.drop_invalid,
                            teachers=config.teachers or None)  # fmt: skip
    # validated: no failed row and every teacher on every instruction (else an error, or --drop-invalid dropped it)
    scores = score_rows(config, loaded.rows.reset_index(drop=True), work, session)
    car = CARChoice(DEFAULT_BETA if config.beta is None else config.beta,
                    DEFAULT_REWARD_SHIFT if config.reward_shift is None else config.reward_shift, "command line")  # fmt: skip
    entries, routers, targets_out = [], [], []
    for base in config.base_models:
        mine = scores[scores["base_model"] == base]
        ids = np.sort(mine["id"].unique())  # the targets' rows, in order
        check_seed(config.seed_instructions, len(ids))
        seeded, _ = seed_rows(len(ids), config.seed_instructions, config.seed)
        shift = _shift(mine[mine["id"].isin(ids[seeded])], car.reward_shift)  # known before the held-out ones
        targets = example_targets(mine, car.beta, shift)
        features = _features(config, base, mine.drop_duplicates("id")[["id", "instruction"]], work, session)
        result = replay(features.loc[targets.index].to_numpy(), targets, config.seed_instructions, config.seed,
                        config.confidence)  # fmt: skip
        entry = _entry(base, result.decision, list(targets.columns), result.n_seed, shift, result.router.penalty)
        entry.update(
            beta=car.beta, score_single=result.score_single, score_routed=result.score_routed,
            score_oracle=result.score_oracle, spend=result.spend, gap_closed=result.gap_closed(),
            n_held_out=result.n_held_out, assigned_held_out=result.assigned,
        )  # fmt: skip
        entries.append(entry)
        seed_means = targets.to_numpy(float)[result.seed_positions].mean(axis=0)
        routers.append(router_rows(base, result.router, result.decision, seed_means))
        role = np.where(np.isin(np.arange(len(targets)), result.seed_positions), "seed", "held_out")
        long = targets.assign(role=role).set_index("role", append=True).stack().rename("target").reset_index()
        targets_out.append(long.assign(base_model=base))
    return entries, routers, targets_out, {"replay": config.replay, "revision": loaded.revision}


def route(config: RouteConfig) -> dict:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """Learns (``--scores``) or replays (``--replay``) the router and writes the router folder; returns what
    route_summary.json holds."""
    from magpie_teach.config import dump_config
    from magpie_teach.scoring.executor import ScoringSession
    from magpie_teach.scoring.features import RULE

    out = Path(config.output_dir)
    with artefacts.locked(out), ScoringSession(out) as session:
        if config.ray_address:
            from magpie_teach.scoring.on_ray import check_cluster

            config.ray_address = check_cluster(config.ray_address, str(out), config.gpus_per_worker,
                                               config.num_workers)  # fmt: skip
        work: dict = {}
        learn = _replay if config.replay is not None else _learn
        entries, routers, targets, provenance = learn(config, session, work)
        summary = {
            "base_models": entries,
            "features": {"rule": RULE, "max_length": config.max_length, "dtype": config.dtype},
            "target": "per example (reward + reward_shift) / (1 + beta * compat_loss), averaged over generations",
            "source": provenance,
            "seed": config.seed,
            "work": work,
        }
        files = artefacts.RunOutputs(out, "route")
        files.write(artefacts.ROUTER, lambda tmp: pd.concat(routers, ignore_index=True).to_parquet(tmp, index=False))
        table = pd.concat(targets, ignore_index=True)[["base_model", "id", "teacher", "target", "role"]]
        files.write(artefacts.ROUTE_TARGETS, lambda tmp: table.to_parquet(tmp, index=False))
        text = json.dumps(summary, indent=2, default=str)
        files.write(artefacts.ROUTE_SUMMARY, lambda tmp: Path(tmp).write_text(text))
        dump_config(config, out / artefacts.ROUTE_CONFIG)
        files.written.add(artefacts.ROUTE_CONFIG)
        files.finish()
    return summary


def describe(summary: dict) -> list[str]:
    """What a user reads at the end: per base model the decision and, for a replay, the held-out figures."""
    lines = []
    for entry in summary["base_models"]:
        lines.append(f"{entry['base_model']}: {entry['decision']}")
        if "score_routed" in entry:
            closed = entry["gap_closed"]
            share = "no gap to close" if not np.isfinite(closed) else f"{closed:.0%} of the gap closed"
            lines.append(
                f"  held out ({entry['n_held_out']} instructions): single {entry['score_single']:.4g}, routed "
                f"{entry['score_routed']:.4g}, oracle {entry['score_oracle']:.4g} ({share}); spend "
                f"{entry['spend']:.1%} of the full grid"
            )
    return lines
