"""The scoring stage of `magpie-teach generate` (a ``scoring:`` block in the config).

After the teachers have answered, a second distilabel pipeline scores every ``ok`` response: one
branch runs :class:`~magpie_teach.steps.score_steps.RewardScore`, one branch per base model
:class:`~magpie_teach.steps.score_steps.CompatibilityScore`; each finished batch is stored (like the
responses) so a killed run resumes without rescoring. CAR and the baselines are then aggregated by
the engine's own functions into ``OUTPUT/rank/``, a folder laid out exactly like `magpie-teach rank`'s
output (``ranking.csv``, ``scores.parquet``, ``summary.json``, ``rank_config.yaml``): `report`,
`select` and `push` read it, and ``magpie-teach rank --config OUTPUT/rank/rank_config.yaml`` gives
the same numbers.
"""

import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from magpie_teach.artefacts import RESPONSES
from magpie_teach.batch_store import BATCH_KEY as KEY
from magpie_teach.errors import MagpieTeachError

if TYPE_CHECKING:
    from magpie_teach.generation.config import GenerateConfig
    from magpie_teach.scoring.rank import RankConfig

REWARD_COLUMNS = ["reward", "reward_truncated"]


def rank_config(config: "GenerateConfig") -> "RankConfig":
    """The `rank` config equivalent to this run's scoring (written to OUTPUT/rank/rank_config.yaml)."""
    import dataclasses

    from magpie_teach.scoring.rank import RankConfig
    from magpie_teach.settings import CARSettings, ClusterSettings, ConfidenceSettings, ModelRunSettings

    spec = config.scoring
    out = Path(config.output_dir)
    shared = {
        f.name: getattr(spec, f.name)
        for cls in (CARSettings, ConfidenceSettings, ModelRunSettings, ClusterSettings)
        for f in dataclasses.fields(cls)
    }
    if shared["ray_address"] is None and config.ray is not None:  # the run's cluster scores too
        shared["ray_address"] = config.ray.address
    return RankConfig(
        data=str(out / RESPONSES), output_dir=str(out / "rank"), base_models=list(spec.base_models),
        reward_model=spec.reward_model, drop_invalid=True, **shared,
    )  # fmt: skip


def _stages(config: "GenerateConfig") -> dict[str, tuple[str, str, list[str]]]:
    """stage -> (step kind, model, score columns)."""
    from magpie_teach.scoring.rank import LM_COLUMNS

    stages = {"reward": ("reward", config.scoring.reward_model, REWARD_COLUMNS)}
    for i, base in enumerate(config.scoring.base_models):
        stages[f"compat-{i}-{hashlib.sha1(base.encode()).hexdigest()[:8]}"] = ("compat", base, list(LM_COLUMNS))
    return stages


def _done(store: Any, stage: str) -> pd.DataFrame:
    stored = store.read(stage)
    return stored if len(stored) else pd.DataFrame(columns=KEY)


def rows_not_stored(rows: pd.DataFrame, done: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``rows`` whose key is not in ``done`` (a batch store's read): what is left to score."""
    marked = rows.merge(done[KEY].assign(_done=True), on=KEY, how="left")
    return rows[marked["_done"].isna().to_numpy()]


def score_responses(config: "GenerateConfig", responses: pd.DataFrame, progress: Any = None) -> dict:
    """Scores ``responses`` (the run's ``responses.parquet``) and writes OUTPUT/rank; returns its counts."""
    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts

    from magpie_teach.batch_store import BatchStore
    from magpie_teach.data import carried_columns, text_columns, validated_responses
    from magpie_teach.scoring.rank import example_scores, write_rank_outputs
    from magpie_teach.steps.pipelines import import_before_fork, scratch_cache, without_distilabel_cache
    from magpie_teach.steps.score_steps import CompatibilityScore, RewardScore, StoreScores, run_checked

    spec = config.scoring
    ranked = rank_config(config)
    source = ranked.data
    Path(ranked.output_dir).mkdir(parents=True, exist_ok=True)
    loaded = validated_responses(responses, source, drop_invalid=True)  # failed generations never get scored
    rows = loaded.rows
    if ranked.ray_address:
        return _score_on_ray(ranked, loaded)
    store = BatchStore(Path(ranked.output_dir) / ".store")
    stages = _stages(config)
    todo = {stage: rows_not_stored(rows, _done(store, stage)) for stage in stages}
    if any(len(t) for t in todo.values()):
        texts = text_columns(rows)
        with Pipeline(name="magpie-teach-score", cache_dir=scratch_cache(config.output_dir, "score")) as pipeline:
            for i, (stage, (kind, model, columns)) in enumerate(stages.items()):
                if todo[stage].empty:
                    continue
                load = LoadDataFromDicts(name=f"load_{i}", data=todo[stage][texts].to_dict("records"),
                                         batch_size=config.batch_size)  # fmt: skip
                settings = dict(max_length=spec.max_length, batch_tokens=spec.batch_tokens, dtype=spec.dtype,
                                device=spec.device, input_batch_size=config.batch_size)  # fmt: skip
                if kind == "reward":
                    scorer = RewardScore(name=f"score_{i}", model=model, **settings)
                else:
                    scorer = CompatibilityScore(name=f"score_{i}", model=model, base_model_name=model, **settings)
                keep = StoreScores(name=f"store_{i}", store_dir=str(store.root), stage=stage, columns=columns,
                                   input_batch_size=config.batch_size)  # fmt: skip
                load >> scorer >> keep
        totals = {stage: len(t) for stage, t in todo.items() if len(t)}
        with progress(store, totals) if progress else contextlib.nullcontext():
            try:
                import_before_fork()
                run_checked(without_distilabel_cache(pipeline), use_cache=False)
            except Exception as err:  # noqa: BLE001 - one message that says what is kept and how to go on
                raise MagpieTeachError(
                    f"scoring failed: {type(err).__name__}: {err}; the scored batches are kept in {store.root}, "
                    "and rerunning the same command scores only the rest"
                ) from err
    stored = {stage: _done(store, stage) for stage in stages}  # each stage's store read once
    missing = {stage: len(rows_not_stored(rows, done)) for stage, done in stored.items()}
    if any(missing.values()):
        raise MagpieTeachError(f"scoring left rows unscored {missing}; rerun the same command to finish them")

    base_rows = rows[text_columns(rows) + carried_columns(rows)].merge(
        stored["reward"][[*KEY, *REWARD_COLUMNS]], on=KEY, how="left", validate="one_to_one"
    )
    counts = dict(loaded.counts)
    counts["reward_truncated"] = int(base_rows["reward_truncated"].sum())
    frames = []
    for stage, (kind, model, _columns) in stages.items():
        if kind != "compat":
            continue
        lm = base_rows[KEY].merge(stored[stage], on=KEY, how="left", validate="one_to_one")
        frames.append(example_scores(base_rows, lm, model))
        counts[f"truncated[{model}]"] = int(frames[-1]["truncated"].sum())
    write_rank_outputs(ranked, pd.concat(frames, ignore_index=True), loaded, counts)
    return counts


def _score_on_ray(ranked: "RankConfig", loaded: Any) -> dict:
    """The scoring stage on a Ray cluster: `rank`'s own path (:func:`magpie_teach.scoring.rank.score_rows`: Ray Data
    actors score, the driver stores each block in the score cache as it arrives, so a rerun resumes from there)."""
    from magpie_teach.scoring.on_ray import check_cluster
    from magpie_teach.scoring.rank import score_rows, truncation_counts, write_rank_outputs

    ranked.ray_address = check_cluster(
        ranked.ray_address, ranked.output_dir, ranked.gpus_per_worker, ranked.num_workers
    )
    work: dict = {}
    scores = score_rows(ranked, loaded.rows, work)
    counts = {**loaded.counts, **truncation_counts(ranked, scores)}
    write_rank_outputs(ranked, scores, loaded, counts, None, work)
    return counts
