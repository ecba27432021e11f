"""`magpie-teach review push|pull`: a stratified sample to an Argilla 2.x server, and the annotations back.

The server URL and API key come from ``ARGILLA_API_URL`` and ``ARGILLA_API_KEY`` (never from a config
file, never printed). Records carry stable ids derived from (base model, teacher, instruction id),
so pushing again updates records instead of duplicating them, and a push that failed midway can
simply be rerun.
"""

import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from magpie_teach.errors import ConfigError, DataError, MagpieTeachError
from magpie_teach.settings import RecordedCARSettings

logger = logging.getLogger(__name__)

PROBLEM_LABELS = ["factual_error", "refusal", "truncated", "wrong_language", "unsafe", "other"]
RATING = "helpfulness"


@dataclass
class ReviewPushConfig(RecordedCARSettings):
    """`review push`'s settings; the per-example CAR uses the ``beta`` `rank` recorded with the scores unless given
    (:class:`magpie_teach.settings.RecordedCARSettings`)."""

    scores: str = field(
        metadata={"help": "A `rank` output folder or its scores.parquet.", "positional": True, "metavar": "SRC"}
    )
    dataset: str = field(metadata={"help": "Argilla dataset name (created on first push, updated after)."})
    base_model: str | None = field(
        default=None, metadata={"help": "Base model whose scores are sampled (needed when there are several)."}
    )
    workspace: str | None = field(
        default=None, metadata={"help": "Argilla workspace (default: the only one the key can see)."}
    )
    per_teacher: int = field(default=5, metadata={"help": "Sampled rows per teacher (flagged rows come on top)."})
    strata: list[str] = field(
        default_factory=lambda: ["reward", "car"],
        metadata={"help": "Metrics whose quantile bands stratify the sample.", "nargs": "+"},
    )
    bands: int = field(default=3, metadata={"help": "Quantile bands per stratum metric."})
    seed: int = field(default=0, metadata={"help": "Seed of the sample."})
    with_vectors: bool = field(
        default=False,
        metadata={"help": "Also send a vector (reward, compat_loss, car) per record for similarity search."},
    )

    def __post_init__(self) -> None:
        self.check_car()


@dataclass
class ReviewPullConfig:
    dataset: str = field(metadata={"help": "Argilla dataset name."})
    output_dir: str = field(
        metadata={"help": "Where reviews.parquet and the summary are written.", "flag": "--output"}
    )
    workspace: str | None = field(default=None, metadata={"help": "Argilla workspace."})
    scores: str | None = field(
        default=None, metadata={"help": "Scores to join the annotations to (default: the values sent as metadata)."}
    )


def record_id(base_model: str, teacher: str, example_id: str) -> str:
    """Stable id of one reviewed response: pushing the same row again updates its record."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"magpie-teach/{base_model}/{teacher}/{example_id}"))


def connect() -> Any:
    """An ``argilla.Argilla`` client from the environment; one-line errors for a bad URL or key."""
    try:
        import argilla as rg
    except ImportError as err:
        raise ConfigError("Argilla review needs the client: pip install 'magpie-teach[argilla]'") from err
    url = os.environ.get("ARGILLA_API_URL")
    key = os.environ.get("ARGILLA_API_KEY")
    if not url or not key:
        raise ConfigError("set ARGILLA_API_URL and ARGILLA_API_KEY to reach an Argilla server")
    try:
        client = rg.Argilla(api_url=url, api_key=key, timeout=30, retries=1)
        client.me  # noqa: B018 - checks the key now rather than at the first write
    except Exception as err:
        raise MagpieTeachError(f"cannot use the Argilla server at {url}: {_reason(err)}") from None
    return client


def _reason(err: Exception) -> str:
    text = str(err).replace(os.environ.get("ARGILLA_API_KEY") or "\0", "***").splitlines()[0][:200]
    name = type(err).__name__
    if "401" in text or "Unauthorized" in name or "Credentials" in name:
        return "the API key was rejected (401)"
    if "Connect" in name or "connect" in text.lower():
        return f"connection failed ({name})"
    return f"{name}: {text}"


def build_settings(with_vectors: bool = False, vector_dimensions: int = 3) -> Any:
    """The review dataset's settings: fields, questions, metadata for filtering, optional vectors."""
    import argilla as rg

    return rg.Settings(
        guidelines=(
            "Rate how helpful the response is to the instruction (1 = useless, 5 = excellent), tick any problem "
            "you see, and add a comment if something stands out. Metadata lets you filter by teacher and score."
        ),
        fields=[
            rg.TextField(name="instruction", title="Instruction", use_markdown=True),
            rg.TextField(name="response", title="Response", use_markdown=True),
        ],
        questions=[
            rg.RatingQuestion(name=RATING, title="How helpful is the response?", values=[1, 2, 3, 4, 5]),
            rg.MultiLabelQuestion(name="problems", title="Problems", labels=PROBLEM_LABELS, required=False),
            rg.TextQuestion(name="comment", title="Comment", required=False, use_markdown=False),
        ],
        metadata=[
            rg.TermsMetadataProperty(name="teacher"),
            rg.TermsMetadataProperty(name="base_model"),
            rg.TermsMetadataProperty(name="example_id"),
            rg.TermsMetadataProperty(name="flags"),
            rg.TermsMetadataProperty(name="stratum"),
            rg.FloatMetadataProperty(name="reward"),
            rg.FloatMetadataProperty(name="compat_loss"),
            rg.FloatMetadataProperty(name="car"),
            rg.IntegerMetadataProperty(name="length"),
        ],
        vectors=[rg.VectorField(name="scores", dimensions=vector_dimensions)] if with_vectors else [],
    )


def _records(sample: pd.DataFrame, with_vectors: bool) -> list[dict]:
    records = []
    for row in sample.itertuples(index=False):
        record = {
            "id": record_id(str(row.base_model), str(row.teacher), str(row.id)),
            "instruction": row.instruction,
            "response": row.response,
            "teacher": str(row.teacher),
            "base_model": str(row.base_model),
            "example_id": str(row.id),
            "flags": row.flags or "none",
            "stratum": str(row.stratum),
            "reward": float(row.reward),
            "compat_loss": float(row.compat_loss),
            "car": float(row.car),
            "length": int(getattr(row, "n_tokens_full", 0) or 0),
        }
        if with_vectors:
            record["scores"] = [float(row.reward), float(row.compat_loss), float(row.car)]
        records.append(record)
    return records


def push_sample(
    sample: pd.DataFrame, dataset_name: str, workspace: str | None = None, with_vectors: bool = False
) -> dict:
    """Logs sampled rows (from :func:`magpie_teach.review.sampling.sample_for_review`) to an Argilla dataset,
    creating it with :func:`build_settings` on first use. Returns a summary."""
    missing = [c for c in ("instruction", "response") if c not in sample.columns]
    if missing:
        raise DataError(f"the rows lack column(s) {missing} needed for review (found {list(sample.columns)})")
    records = _records(sample, with_vectors)
    client = connect()
    try:
        dataset = client.datasets(name=dataset_name, workspace=workspace)
        if dataset is None:
            import argilla as rg

            dataset = rg.Dataset(
                name=dataset_name, workspace=workspace, settings=build_settings(with_vectors), client=client
            ).create()
        dataset.records.log(records)
    except MagpieTeachError:
        raise
    except Exception as err:
        raise MagpieTeachError(
            f"pushing to Argilla dataset {dataset_name!r} failed: {_reason(err)}; rerun the same command to finish "
            "(records have stable ids, so nothing is duplicated)"
        ) from None
    return {
        "dataset": dataset_name,
        "records": len(records),
        "record_ids": [r["id"] for r in records],
        "per_teacher": {str(k): int(v) for k, v in sample["teacher"].value_counts().sort_index().items()},
        "flagged": int((sample["flags"] != "").sum()),
    }


def push_for_review(config: ReviewPushConfig) -> dict:
    """Samples rows (see :mod:`magpie_teach.review.sampling`) and logs them to Argilla. Returns a summary."""

    sample = review_sample(config)
    return push_sample(sample, config.dataset, config.workspace, config.with_vectors)


def review_sample(config: ReviewPushConfig) -> pd.DataFrame:
    """The rows `review push` sends: :func:`magpie_teach.review.sampling.sample_for_review` over the scores, with
    the per-example CAR at the beta `rank` recorded (unless ``config.beta`` is given)."""
    from magpie_teach.artefacts import TEXT_COLUMNS, open_scores, recorded_rank_config
    from magpie_teach.review.sampling import sample_for_review

    source = open_scores(config.scores, config.base_model)
    car = config.car(*recorded_rank_config(config.scores))
    logger.info("review push: %s", car.describe())
    sample = sample_for_review(source.keys(), config.per_teacher, config.strata, config.bands, config.seed, car.beta)
    columns = [c for c in TEXT_COLUMNS if c in source.table.columns]
    texts = pd.concat(list(source.rows(sample["_pos"], columns)), ignore_index=True)  # the sampled rows' texts only
    return sample.merge(texts, on="_pos", how="left", validate="one_to_one").drop(columns="_pos")


def pull_reviews(config: ReviewPullConfig) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Fetches submitted responses, one row per (record, annotator), joined to the scored rows; writes
    ``reviews.parquet``, ``review_summary.csv`` and ``review_summary.json`` under ``output_dir``."""
    from magpie_teach.artefacts import REVIEW_AGREEMENT, REVIEW_SUMMARY, REVIEWS, RunOutputs, locked
    from magpie_teach.review.summary import summarize_reviews

    client = connect()
    dataset = client.datasets(name=config.dataset, workspace=config.workspace)
    if dataset is None:
        raise ConfigError(
            f"no Argilla dataset {config.dataset!r}"
            + (f" in workspace {config.workspace!r}" if config.workspace else "")
        )
    rows = []
    try:
        for record in dataset.records(with_responses=True):
            meta = record.metadata
            by_user: dict[str, dict] = {}
            for response in record.responses:
                if str(getattr(response.status, "value", response.status)) != "submitted":
                    continue
                by_user.setdefault(str(response.user_id), {})[response.question_name] = response.value
            for user, answers in by_user.items():
                rows.append(
                    {
                        "record_id": str(record.id), "id": meta.get("example_id"), "teacher": meta.get("teacher"),
                        "base_model": meta.get("base_model"), "annotator": user, RATING: answers.get(RATING),
                        "problems": answers.get("problems") or [], "comment": answers.get("comment"),
                        "reward": meta.get("reward"), "compat_loss": meta.get("compat_loss"), "car": meta.get("car"),
                        "flags": meta.get("flags"),
                    }
                )  # fmt: skip
    except Exception as err:
        raise MagpieTeachError(f"reading Argilla dataset {config.dataset!r} failed: {_reason(err)}") from None
    reviews = pd.DataFrame(
        rows,
        columns=[
            "record_id",
            "id",
            "teacher",
            "base_model",
            "annotator",
            RATING,
            "problems",
            "comment",
            "reward",
            "compat_loss",
            "car",
            "flags",
        ],
    )
    if config.scores and len(reviews):
        from magpie_teach.artefacts import load_scores

        scores = pd.concat([load_scores(config.scores, b) for b in reviews["base_model"].unique()])
        scored = scores.drop(columns=[c for c in ("reward", "compat_loss") if c in reviews.columns])
        reviews = reviews.merge(scored, on=["id", "teacher", "base_model"], how="left", suffixes=("", "_scored"))
    table, agreement = summarize_reviews(reviews)
    text = json.dumps({"agreement": agreement, "records": len(reviews)}, indent=2)
    with locked(config.output_dir):  # one run per folder; its manifest names this run's files
        files = RunOutputs(config.output_dir, "review")
        files.write(REVIEWS, lambda tmp: reviews.to_parquet(tmp, index=False))
        files.write(REVIEW_SUMMARY, lambda tmp: table.to_csv(tmp, index=False))
        files.write(REVIEW_AGREEMENT, lambda tmp: Path(tmp).write_text(text))
        files.finish()
    return reviews, table, agreement
