"""The scoring stage of `magpie-teach generate` (a ``scoring:`` block in the config).

After the teachers have answered, every ``ok`` response is scored by `rank`'s own executor (here, or on the
run's Ray cluster) through the content-keyed score cache, the one resume store of every verb that scores: a
killed run resumes without rescoring, and a `rank` of the responses afterwards scores nothing again. (The
distilabel scoring steps, :mod:`magpie_teach.steps.score_steps`, remain for pipelines of your own.) CAR and the
baselines are aggregated into ``OUTPUT/rank/``, a folder laid out exactly like `magpie-teach rank`'s
output (``ranking.csv``, ``scores.parquet``, ``summary.json``, ``rank_config.yaml``): `report`,
`select` and `push` read it, and ``magpie-teach rank --config OUTPUT/rank/rank_config.yaml`` gives
the same numbers.
"""

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from magpie_teach.artefacts import RESPONSES

if TYPE_CHECKING:
    from magpie_teach.generation.config import GenerateConfig
    from magpie_teach.ranking.rank import RankConfig


def rank_config(config: "GenerateConfig") -> "RankConfig":
    """The `rank` config equivalent to this run's scoring (written to OUTPUT/rank/rank_config.yaml)."""
    import dataclasses

    from magpie_teach.ranking.rank import RankConfig
    from magpie_teach.settings import CARSettings, ConfidenceSettings, ScoringRunSettings

    spec = config.scoring
    out = Path(config.output_dir)
    shared = {
        f.name: getattr(spec, f.name)
        for cls in (CARSettings, ConfidenceSettings, ScoringRunSettings)
        for f in dataclasses.fields(cls)
    }
    shared["base_models"] = list(spec.base_models)
    if shared["ray_address"] is None and config.ray is not None:  # the run's cluster scores too
        shared["ray_address"] = config.ray.address
    return RankConfig(data=str(out / RESPONSES), output_dir=str(out / "rank"), drop_invalid=True, **shared)


def score_responses(config: "GenerateConfig", responses: pd.DataFrame) -> dict:
    """Scores ``responses`` (the run's ``responses.parquet``) and writes OUTPUT/rank; returns its counts.

    The scoring executor (:func:`magpie_teach.scoring.executor.score_rows`), here or on the run's Ray cluster,
    through the content-keyed score cache: a killed run resumes from its last finished window, and a `rank` of the
    same responses and models afterwards (or a `probe` before) scores nothing twice."""
    from magpie_teach.data import validated_responses
    from magpie_teach.ranking.rank import write_rank_outputs
    from magpie_teach.scoring.executor import ScoringSession, score_rows, truncation_counts

    ranked = rank_config(config)
    Path(ranked.output_dir).mkdir(parents=True, exist_ok=True)
    loaded = validated_responses(responses, ranked.data, drop_invalid=True)  # failed generations never get scored
    if ranked.ray_address:
        from magpie_teach.scoring.on_ray import check_cluster

        ranked.ray_address = check_cluster(
            ranked.ray_address, ranked.output_dir, ranked.gpus_per_worker, ranked.num_workers
        )
    work: dict = {}
    with ScoringSession(ranked.output_dir) as session:
        scores = score_rows(ranked, loaded.rows, work, session)
    counts = {**loaded.counts, **truncation_counts(ranked, scores)}
    write_rank_outputs(ranked, scores, loaded, counts, None, work)
    return counts
