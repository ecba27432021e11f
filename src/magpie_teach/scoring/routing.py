"""Applying a router (the output folder of `magpie-teach route`, :mod:`magpie_teach.ranking.route`): its file read
and written (``router.parquet``: per base model and teacher, that teacher's column of the ridge head of
:mod:`magpie_teach.scoring.route`), and which teacher writes each instruction (:func:`assignments`), from a router
(the base model's features computed through the score cache) or from an assignment file. `generate`'s ``routing:``
block and `select --strategy routed` read it here.
"""

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach import artefacts
from magpie_teach.errors import ConfigError, DataError
from magpie_teach.settings import ClusterSettings, ModelRunSettings, ScoreCacheSettings

# ---- the router artefact ---------------------------------------------------------------------------------------


def router_rows(base_model: str, router: Any, decision: Any, seed_means: np.ndarray) -> pd.DataFrame:
    """``router.parquet``'s rows of one base model: per teacher, its column of the head (features' weights, then
    the intercept), the standardisation and the penalty (repeated on each row), whether it is the fall-back."""
    return pd.DataFrame({
        "base_model": base_model,
        "teacher": router.teachers,
        "weights": [router.weights[:, j].tolist() for j in range(len(router.teachers))],
        "feature_mean": [router.mean.tolist()] * len(router.teachers),
        "feature_scale": [router.scale.tolist()] * len(router.teachers),
        "penalty": router.penalty,
        "mean_target": seed_means,
        "single_teacher": [t == decision.single_teacher for t in router.teachers],
        "routed": decision.routed,
    })  # fmt: skip


@dataclass
class RouterArtefact:
    """A router folder read back: per base model its :class:`magpie_teach.scoring.route.Router`, whether it routes
    (else every instruction goes to ``single[base]``), and the summary it was written with."""

    source: str
    routers: dict[str, Any]
    routed: dict[str, bool]
    single: dict[str, str]
    summary: dict

    def base_model(self, wanted: str | None) -> str:
        """WANTED among the router's base models (None: its only one), by its name, its last path component, or, for
        a router published from a local model (``NAME@sha256:DIGEST``), the NAME; ConfigError naming them otherwise."""
        from magpie_teach.artefacts import short_name

        names = list(self.routers)
        if wanted is None:
            if len(names) > 1:
                raise ConfigError(f"{self.source} routes for several base models; choose one: {names}")
            return names[0]

        def stem(name: str) -> str:
            return short_name(name).split("@sha256:")[0]

        found = [n for n in names if n == wanted] or [n for n in names if short_name(n) == short_name(wanted)]
        found = found or [n for n in names if stem(n) == stem(wanted)]
        if len(found) != 1:
            raise ConfigError(f"{self.source}: no router for base model {wanted!r}; it has {names}")
        return found[0]


def feature_model(name: str, wanted: str | None) -> str:
    """The model that computes the features of a router learnt on base model NAME: NAME itself, or for a router
    published from a local model (``NAME@sha256:DIGEST``) WANTED, the local copy, whose files must be the ones the
    router learnt on (the same digest)."""
    if "@sha256:" not in name:
        return wanted if wanted and Path(wanted).expanduser().exists() else name
    if not wanted or not Path(wanted).expanduser().exists():
        raise ConfigError(f"the router learnt on {name}, a local model's published name: give the path of your copy "
                          "of it as the routing's base_model")  # fmt: skip
    mine = artefacts.public_name(wanted)
    if mine != name:
        raise DataError(f"{wanted}: its files ({mine}) are not those of the model the router learnt on ({name})")
    return wanted


def _router_files(source: str, revision: str | None) -> tuple[Path, Path, str]:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """(router.parquet, route_summary.json, the name to cite) of a `route` folder, or of a router pushed to the Hub
    (ORG/NAME at REVISION, read at the commit it points to)."""
    folder = Path(source).expanduser()
    if folder.exists() or source.count("/") != 1 or source.startswith((".", "/", "~")):
        if not (folder / artefacts.ROUTER).exists():
            raise DataError(f"{source}: no {artefacts.ROUTER}; give the output folder of `magpie-teach route` (or a "
                            "router pushed to the Hub, ORG/NAME)")  # fmt: skip
        artefacts.verify_run(folder, "routing")
        return folder / artefacts.ROUTER, folder / artefacts.ROUTE_SUMMARY, str(folder)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    from magpie_teach.errors import network_errors
    from magpie_teach.tables import hub_commit

    commit = hub_commit(source, revision)
    try:
        summary = hf_hub_download(source, f"magpie_teach/{artefacts.ROUTE_SUMMARY}", repo_type="dataset",
                                  revision=commit)  # fmt: skip
        data = hf_hub_download(source, artefacts.SFT_DATA, repo_type="dataset", revision=commit)
    except EntryNotFoundError:
        raise DataError(f"{source}@{commit}: not a router pushed by magpie-teach (no magpie_teach/"
                        f"{artefacts.ROUTE_SUMMARY})") from None  # fmt: skip
    except network_errors() as err:
        raise DataError(f"{source}@{commit}: could not be read from the Hub: {str(err).splitlines()[0]}") from None
    return Path(data), Path(summary), f"{source}@{commit}"


def read_router(source: str | Path, revision: str | None = None) -> RouterArtefact:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """The router a `route` run wrote into the folder SOURCE (a finished run's, see
    :func:`magpie_teach.artefacts.verify_run`), or pushed to the Hub as ORG/NAME (at REVISION)."""
    from magpie_teach.scoring.route import Router

    data, summary_file, name = _router_files(str(source), revision)
    table = pd.read_parquet(data)
    summary = json.loads(summary_file.read_text())
    routers, routed, single = {}, {}, {}
    for base, rows in table.groupby("base_model", sort=False):
        weights = np.array([np.asarray(w, float) for w in rows["weights"]]).T
        routers[str(base)] = Router(rows["teacher"].astype(str).tolist(), np.asarray(rows["feature_mean"].iloc[0], float),
                                    np.asarray(rows["feature_scale"].iloc[0], float), weights,
                                    float(rows["penalty"].iloc[0]))  # fmt: skip
        routed[str(base)] = bool(rows["routed"].iloc[0])
        single[str(base)] = str(rows.loc[rows["single_teacher"], "teacher"].iloc[0])
    return RouterArtefact(name, routers, routed, single, summary)


# ---- applying a router: which teacher writes each instruction ---------------------------------------------------


@dataclass(kw_only=True)
class RoutingSettings(ModelRunSettings, ClusterSettings, ScoreCacheSettings):
    """Where each instruction's teacher comes from: ``router`` (a `route` output folder: the base model's features
    are computed through the score cache, with the router's recorded ``max_length``) or ``assignments`` (a file of
    ``id`` and ``teacher``); ``base_model`` picks one of the router's base models when it holds several (for a router
    pushed from a local model, ``NAME@sha256:DIGEST``, the path of your copy of it); ``revision`` reads a router pushed
    to the Hub (ORG/NAME) at that branch, tag or commit. The model run's device and dtype and the score cache are the
    scoring run's settings."""

    router: str | None = None
    assignments: str | None = None
    base_model: str | None = None
    revision: str | None = None  # of a router pushed to the Hub (ORG/NAME)

    def check_routing(self, where: str = "routing.") -> None:
        if (self.router is None) == (self.assignments is None):
            raise ConfigError(f"{where}router or {where}assignments: give exactly one (a `route` output folder, or "
                              "a file of id and teacher)")  # fmt: skip
        self.check_run(where)
        self.check_cluster(where)


def read_assignment_file(path: str) -> pd.DataFrame:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """An assignment file (parquet, CSV or JSON lines) of ``id`` and ``teacher``: one teacher per instruction."""
    file = Path(path)
    try:
        if file.suffix == ".parquet":
            table = pd.read_parquet(file)
        elif file.suffix == ".csv":
            table = pd.read_csv(file, dtype={"id": str})
        else:
            table = pd.read_json(file, lines=True, dtype={"id": str})
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable assignment file ({err}); expected parquet, CSV or JSON lines with "
                        "columns id and teacher") from None  # fmt: skip
    missing = [c for c in ("id", "teacher") if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; an assignment file has id and teacher")
    repeated = table.loc[table["id"].duplicated(), "id"]
    if len(repeated):
        raise DataError(f"{path}: instruction {repeated.iloc[0]!r} is assigned more than once: every instruction "
                        "is written once")  # fmt: skip
    return table[["id", "teacher"]].astype({"id": str, "teacher": str})


def assignments(settings: RoutingSettings, instructions: pd.DataFrame, teachers: list[str],
                folder: Path | None = None) -> tuple[pd.DataFrame, dict]:  # fmt: skip
    """Which teacher writes each of INSTRUCTIONS (``id``, ``instruction``): a frame of ``id``, ``teacher`` and
    ``how`` (``routed``: the router's choice; ``single``: the router fell back to the single best teacher;
    ``file``: the assignment file's), in the instructions' order; and what the card says of it. A teacher that is
    not among TEACHERS, or an instruction the file leaves out, is an error naming it."""
    ids = instructions["id"].astype(str)
    if settings.assignments is not None:
        table = read_assignment_file(settings.assignments).set_index("id")
        absent = ids[~ids.isin(table.index)]
        if len(absent):
            raise DataError(f"{settings.assignments}: no teacher for instruction {absent.iloc[0]!r} (and "
                            f"{len(absent) - 1} more): every instruction needs one")  # fmt: skip
        chosen = table.loc[ids, "teacher"].to_numpy()
        how, about = np.full(len(ids), "file"), {"source": settings.assignments, "how": "assignment file"}
    else:
        router = read_router(settings.router, settings.revision)
        base = router.base_model(settings.base_model)
        recorded = router.summary.get("features") or {}
        if router.routed[base]:
            from magpie_teach.scoring.executor import ScoringSession, instruction_features
            from magpie_teach.scoring.features import COLUMNS, RULE

            if recorded.get("rule") not in (None, RULE):
                raise DataError(f"{settings.router}: its features are {recorded['rule']!r}, this version computes "
                                f"{RULE!r}; train the router again with this version")  # fmt: skip
            run = dataclasses.replace(settings, max_length=int(recorded.get("max_length", settings.max_length)))
            with ScoringSession(folder) as session:
                model = feature_model(base, settings.base_model)
                features = instruction_features(run, model, instructions.assign(id=ids), None, session)
            matrix = features.set_index("id").loc[ids, COLUMNS].to_numpy(float)
            head = router.routers[base]
            chosen = np.asarray(head.teachers)[head.choose(matrix)]
            how = np.full(len(ids), "routed")
        else:
            chosen, how = np.full(len(ids), router.single[base]), np.full(len(ids), "single")
        entry = next((e for e in router.summary.get("base_models", []) if e.get("base_model") == base), {})
        about = {"source": router.source, "base_model": base, "how": "router" if router.routed[base] else
                 "single teacher (the router's fall-back)", "decision": entry.get("decision")}  # fmt: skip
    frame = pd.DataFrame({"id": ids.to_numpy(), "teacher": chosen.astype(str), "how": how})
    unknown = sorted(set(frame["teacher"]) - set(teachers))
    if unknown:
        raise ConfigError(f"{about['source']} sends instructions to {unknown}, which are not among the teachers "
                          f"{teachers}")  # fmt: skip
    about["rows_per_teacher"] = {t: int(n) for t, n in frame["teacher"].value_counts().sort_index().items()}
    return frame, about


def routing_source(path: str, revision: str | None = None) -> RoutingSettings:
    # pragma: no mutate block (reading and writing files: `make mutation` tests the pure functions it calls)
    """PATH as a routing: a `route` output folder or a router pushed to the Hub (ORG/NAME, at REVISION), a routed
    `generate` folder (its routing.csv: the teacher each instruction was sent to) or an assignment file."""
    folder = Path(path)
    if (folder / artefacts.ROUTING).exists():
        artefacts.verify_run(folder, "routing")
        return RoutingSettings(assignments=str(folder / artefacts.ROUTING))
    if folder.is_file():
        return RoutingSettings(assignments=str(folder))
    if folder.exists() and not (folder / artefacts.ROUTER).exists():
        raise DataError(f"{path}: neither a `route` output folder ({artefacts.ROUTER}), a routed `generate` folder "
                        f"({artefacts.ROUTING}) nor an assignment file")  # fmt: skip
    return RoutingSettings(router=str(path), revision=revision)  # a `route` folder, or a router pushed to the Hub
