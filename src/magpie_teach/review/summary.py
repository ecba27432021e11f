"""How well reward and CAR agree with people: per-teacher ratings, Spearman rho, annotator agreement."""

from itertools import combinations

import numpy as np
import pandas as pd


def _rho(a: pd.Series, b: pd.Series) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or a.nunique() < 2 or b.nunique() < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def summarize_reviews(reviews: pd.DataFrame, rating: str = "helpfulness") -> tuple[pd.DataFrame, dict]:
    """Per teacher (and ``all``): reviewed records, mean human rating, rho(rating, reward), rho(rating, car).

    Ratings of one record by several annotators are averaged first. Agreement (several annotators):
    over every pair of annotators and the records both rated, the share of identical ratings and
    Spearman rho of their ratings, averaged over pairs.
    """
    rated = reviews.dropna(subset=[rating])
    per_record = rated.groupby("record_id").agg(
        teacher=("teacher", "first"), reward=("reward", "first"), car=("car", "first"), rating=(rating, "mean")
    )
    rows = []
    for teacher, group in [*per_record.groupby("teacher"), ("all", per_record)]:
        rows.append(
            {
                "teacher": teacher,
                "n_records": len(group),
                "mean_rating": float(group["rating"].mean()) if len(group) else float("nan"),
                "rho_rating_reward": _rho(group["rating"], group["reward"]),
                "rho_rating_car": _rho(group["rating"], group["car"]),
            }
        )
    table = pd.DataFrame(rows)
    wide = rated.pivot_table(index="record_id", columns="annotator", values=rating, aggfunc="mean")
    pairs = []
    for a, b in combinations(wide.columns, 2):
        both = wide[[a, b]].dropna()
        if len(both):
            pairs.append((float((both[a] == both[b]).mean()), _rho(both[a], both[b]), len(both)))
    agreement = {
        "annotators": int(wide.shape[1]),
        "pairs": len(pairs),
        "exact_agreement": float(np.mean([p[0] for p in pairs])) if pairs else None,
        "mean_pairwise_rho": float(np.nanmean([p[1] for p in pairs]))
        if pairs and not all(np.isnan(p[1]) for p in pairs)
        else None,
    }
    return table, agreement
