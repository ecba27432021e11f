"""The output folders that flow between verbs: their file names, and how a run writes one.

A folder describes exactly one run. A run holds the folder's lock while it works (a second run into
the same folder stops at once with an error naming the folder and the process holding it), writes
each file atomically, and at the end removes the files of its kind that an earlier run left and this
run did not write (a ``dropped.csv`` from an earlier ``--drop-invalid`` run, say), so a push or a
report never mixes two runs.
"""

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magpie_teach.errors import ConfigError, DataError

# ---- file names, per kind of folder --------------------------------------------------------------
INSTRUCTIONS = "instructions.parquet"
RESPONSES = "responses.parquet"
GENERATE_CONFIG = "generate_config.yaml"
GENERATE_SUMMARY = "summary.json"
COMMAND_FILE = "command.json"  # the command line that produced a folder, for its dataset card
SCORES = "scores.parquet"
RANKING = "ranking.csv"
CORRELATIONS = "correlations.csv"
RANK_DROPPED = "dropped.csv"
RANK_SUMMARY = "summary.json"
RANK_CONFIG = "rank_config.yaml"
SFT_DATA = "data/train-00000-of-00001.parquet"
SFT_README = "README.md"
SELECT_SUMMARY = "selection_summary.json"
SELECT_DROPPED = "dropped.parquet"
SELECT_CONFIG = "select_config.yaml"
PROBE_SUMMARY = "probe_summary.json"
PROBE_ROUNDS = "probe_rounds.csv"
PROBE_RANK = "rank"  # the probe's rank-layout folder of everything it scored
JUDGEMENTS = "judgements.parquet"
WIN_RATES = "win_rates.csv"
PERFORMANCE = "performance.csv"  # the layout `rank --performance` reads
EVALUATE_CONFIG = "evaluate_config.yaml"
CALIBRATION = "calibration.json"  # what `rank --beta-from` reads
BETA_CURVE = "beta_curve.csv"
CALIBRATION_FIGURE = "calibration.png"
STUDENTS = "students.csv"  # validate: one row per teacher's student and its score
REVIEWS = "reviews.parquet"  # review pull: one row per (record, annotator)
REVIEW_SUMMARY = "review_summary.csv"
REVIEW_AGREEMENT = "review_summary.json"
REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
ROUTER = "router.parquet"  # route: one row per (base model, teacher): the ridge head's weights
ROUTE_SUMMARY = "route_summary.json"
ROUTE_CONFIG = "route_config.yaml"
ROUTE_TARGETS = "route_targets.parquet"  # route: the training data (per instruction and teacher, its target)
ROUTING = "routing.csv"  # generate with routing: which teacher writes each instruction, and why

# every file a run of each verb may write into its output folder (what another run of it may have left)
OUTPUTS: dict[str, tuple[str, ...]] = {
    # instructions.parquet is a cache a rerun reads
    "generate": (RESPONSES, GENERATE_CONFIG, GENERATE_SUMMARY, ROUTING),
    "rank": (SCORES, RANKING, CORRELATIONS, RANK_DROPPED, RANK_SUMMARY, RANK_CONFIG),
    "select": (SFT_DATA, SFT_README, SELECT_SUMMARY, SELECT_DROPPED, SELECT_CONFIG),
    "probe": (PROBE_SUMMARY, PROBE_ROUNDS),
    "evaluate": (JUDGEMENTS, WIN_RATES, PERFORMANCE, EVALUATE_CONFIG),
    "calibrate": (CALIBRATION, CORRELATIONS, BETA_CURVE, CALIBRATION_FIGURE),
    "report": (REPORT_MARKDOWN, REPORT_HTML),  # and figures/, written with them
    # and its resumable work: students/, data/ (select's folders), generations/
    "validate": (STUDENTS, CORRELATIONS, RANKING, JUDGEMENTS, WIN_RATES),
    "review": (REVIEWS, REVIEW_SUMMARY, REVIEW_AGREEMENT),
    "route": (ROUTER, ROUTE_SUMMARY, ROUTE_CONFIG, ROUTE_TARGETS),
}
LOCK = ".magpie-teach.lock"
RAY_STAGING = ".ray-staging"  # the rows a Ray cluster scores, staged where every node reads (removed when done)
FOLDER_SCORE_CACHE = ".score-cache"  # scores of models whose weights cannot be named, for reruns into the folder
MANIFEST = "manifest.json"
"""Written first as ``{"complete": false}`` and last with every file's digest: the run that wrote a folder, and
the proof that the folder's files are that run's (see :func:`verify_run`)."""


@dataclass(frozen=True)
class Kind:
    """What one artefact kind publishes: its data file and the side files that describe it."""

    config: str
    data: str
    summary: str | None
    extras: tuple[str, ...] = ()


KINDS: dict[str, Kind] = {  # what `push` publishes of each kind of folder
    "instructions": Kind(GENERATE_CONFIG, INSTRUCTIONS, None),
    "responses": Kind(GENERATE_CONFIG, RESPONSES, GENERATE_SUMMARY, (ROUTING,)),
    "scores": Kind(RANK_CONFIG, SCORES, RANK_SUMMARY, (RANKING, CORRELATIONS, RANK_DROPPED)),
    "ranking": Kind(RANK_CONFIG, RANKING, RANK_SUMMARY, (CORRELATIONS, RANK_DROPPED)),
    "sft": Kind(SELECT_CONFIG, SFT_DATA, SELECT_SUMMARY, (SELECT_DROPPED,)),
    "evaluation": Kind(EVALUATE_CONFIG, JUDGEMENTS, None, (WIN_RATES, PERFORMANCE)),
    "router": Kind(ROUTE_CONFIG, ROUTER, ROUTE_SUMMARY, (ROUTE_TARGETS,)),
}  # fmt: skip
DEFAULT_KIND = {
    GENERATE_CONFIG: "responses",
    RANK_CONFIG: "ranking",
    SELECT_CONFIG: "sft",
    EVALUATE_CONFIG: "evaluation",
    ROUTE_CONFIG: "router",
}


def detect_kind(source: Path, kind: str | None) -> str:
    """The kind of the output folder SOURCE (given, or found from its config file); DataError when it holds none."""
    if not source.is_dir():
        raise DataError(
            f"{source}: not a folder; push takes the output folder of magpie-teach generate, rank, select, evaluate or route."
        )
    if kind is None:
        found = [DEFAULT_KIND[name] for name in DEFAULT_KIND if (source / name).exists()]
        if not found:
            raise DataError(
                f"{source}: none of {', '.join(DEFAULT_KIND)} is there; push takes the output folder of "
                "magpie-teach generate, rank, select, evaluate or route."
            )
        kind = found[0]
    spec = KINDS[kind]
    for name in (spec.config, spec.data):
        if not (source / name).exists():
            raise DataError(f"{source}: {name} is missing, so it holds no {kind} artefact to publish.")
    return kind


def record_command(output_dir: str | Path, argv: list[str]) -> None:
    """Writes OUTPUT/command.json (the argv of the command that produced the folder) for the card."""
    from magpie_teach import __version__

    path = Path(output_dir) / COMMAND_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"argv": list(argv), "magpie_teach_version": __version__}, indent=2)
    write_atomic(path, lambda tmp: Path(tmp).write_text(body))
    manifest = _read_manifest(path.parent)
    if manifest.get("complete"):  # the command belongs to the run the manifest names: listed with its digest
        manifest["files"][COMMAND_FILE] = content_digest(path)
        manifest["command"] = list(argv)
        _write_manifest(path.parent, manifest)


def slug(name: str) -> str:
    """NAME as a file or folder name: letters, digits, '-', '.' and '_' kept, anything else '_'."""
    return "".join(c if c.isalnum() or c in "-._" else "_" for c in name)


def content_digest(path: str | os.PathLike) -> str:
    """SHA-256 (hex) of a file's content, or of a folder's files (relative path, then content; hidden files left
    out), so that two copies of the same files get the same digest."""
    import hashlib

    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )  # fmt: skip
    for file in files:
        if file is not path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def public_name(value: str) -> str:
    """The published name of local path VALUE (:mod:`magpie_teach.hub.provenance`): a model folder (with a
    ``config.json``) or a file ``NAME@sha256:DIGEST`` (the first 12 hex digits of :func:`content_digest`), any other
    folder its name."""
    path = Path(value).expanduser()
    name = path.resolve().name
    if path.is_file() or (path / "config.json").is_file():
        return f"{name}@sha256:{content_digest(path)[:12]}"
    return name


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Calls ``write(tmp_path)`` then renames onto ``path``: readers never see a half-written file. The file
    gets the mode the umask gives a new file (the temporary file starts private)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Creates FOLDER when needed and writes (then removes) a file in it: a ConfigError in one line naming WHAT and
    the folder when that fails (read-only storage, a file in the way, no permission), so a run stops before any
    model loads rather than after it has scored."""
    import tempfile

    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"{what} {folder} cannot be written: {err.strerror or err}") from None
    return folder


@contextlib.contextmanager
def locked(folder: str | os.PathLike) -> Iterator[Path]:
    """Holds FOLDER's lock for the block (created if needed); DataError at once if another process holds it.

    The lock is an ``flock`` on ``FOLDER/.magpie-teach.lock``: the kernel releases it when its holder
    exits by any means, so a killed run never leaves the folder locked. A run that wrote nothing (it
    stopped on bad input) leaves no folder behind when it had to create one.
    """
    import fcntl

    folder = Path(folder)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = open(folder / LOCK, "a+")  # noqa: SIM115 - held for the whole block
    except OSError as err:
        raise ConfigError(f"the output folder {folder} cannot be written: {err.strerror or err}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise DataError(
                f"{folder} is in use by another run ({holder}); wait for it to finish, or give this run another "
                "output folder"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        yield folder
    finally:
        if (
            created
            and {p.name for p in folder.iterdir()} <= {LOCK, MANIFEST}
            and not _read_manifest(folder).get("complete")
        ):
            (folder / MANIFEST).unlink(missing_ok=True)  # the manifest of a run that wrote nothing else
            (folder / LOCK).unlink()  # still locked by this handle: no other run can have taken it
            folder.rmdir()
        handle.close()


class RunOutputs:
    """The files one run writes into its folder; :meth:`finish` removes what an earlier run left and writes the
    manifest.

    A folder holds one run: a folder that holds another verb's run (its manifest, or another kind's config
    file) is refused before anything is written. The run first writes a manifest that says it is not complete
    (so a run killed half-way leaves a folder that every reader refuses) and removes the earlier run's command
    record; :meth:`finish` writes the manifest again with the run id, the kind and each file's digest."""

    def __init__(self, folder: str | os.PathLike, kind: str):
        import uuid

        self.folder, self.kind = Path(folder), kind
        self.written: set[str] = set()
        self.run_id = uuid.uuid4().hex
        other = _other_run(self.folder, kind)
        if other:
            raise DataError(f"{self.folder}: it holds {other}; a folder holds one run: give `{kind}` another "
                            "--output (or delete that run first)")  # fmt: skip
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / COMMAND_FILE).unlink(missing_ok=True)
        _write_manifest(self.folder, {"run_id": self.run_id, "kind": kind, "complete": False})

    def write(self, name: str, write: Callable[[str], Any]) -> Path:
        path = self.folder / name
        write_atomic(path, write)
        self.written.add(name)
        return path

    def finish(self) -> list[str]:
        """Removes the kind's files this run did not write, then writes the complete manifest; returns the names
        removed."""
        import datetime

        stale = [name for name in OUTPUTS[self.kind] if name not in self.written and (self.folder / name).exists()]
        for name in stale:
            (self.folder / name).unlink()
        files = {name: content_digest(self.folder / name) for name in sorted(self.written)}
        finished = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        _write_manifest(self.folder, {"run_id": self.run_id, "kind": self.kind, "complete": True,
                                      "finished": finished, "files": files})  # fmt: skip
        return stale


def _read_manifest(folder: Path) -> dict:
    """FOLDER's manifest, or {} when it has none or it cannot be read (:func:`verify_run` tells those apart)."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _write_manifest(folder: Path, body: dict) -> None:
    text = json.dumps(body, indent=2) + "\n"
    write_atomic(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def _other_run(folder: Path, kind: str) -> str | None:
    """What in FOLDER says it holds another verb's run than KIND's: its manifest's kind, or another kind's files."""
    manifest = _read_manifest(folder)
    if manifest.get("kind") not in (None, kind):
        return f"a `{manifest['kind']}` run ({MANIFEST})"
    for other, names in OUTPUTS.items():
        if other != kind:
            found = [n for n in names if n not in OUTPUTS[kind] and (folder / n).exists()]
            if found:
                return f"a `{other}` run's {found[0]}"
    return None


def verify_run(folder: str | os.PathLike, reader: str) -> dict | None:
    """Checks that FOLDER's files are one finished run's (its manifest, see :class:`RunOutputs`): a run that did
    not finish, a file changed or copied in since, a file listed and missing, or a file of its kind that the run
    did not write is a one-line DataError naming it. Returns the manifest; None for a folder with none (written
    by hand or by a version before manifests), which is read as it is."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DataError(f"{folder / MANIFEST}: unreadable ({err}); {reader} reads only a finished run") from None
    kind = manifest.get("kind")
    if not manifest.get("complete"):
        raise DataError(f"{folder}: its `{kind}` run did not finish (killed, or still running): {reader} reads only "
                        f"a finished run; rerun `magpie-teach {kind}` into it")  # fmt: skip
    files = manifest.get("files") or {}
    for name, digest in files.items():
        path = folder / name
        if not path.exists():
            raise DataError(f"{path}: missing, though the `{kind}` run that wrote {folder} listed it")
        if content_digest(path) != digest:
            raise DataError(f"{path}: changed since the `{kind}` run wrote {folder} (run {manifest.get('run_id')}); "
                            f"{reader} reads only one run's files: rerun `magpie-teach {kind}`")  # fmt: skip
    extra = [n for n in OUTPUTS.get(kind, ()) if n not in files and (folder / n).exists()]
    if extra:
        raise DataError(f"{folder / extra[0]}: not written by the `{kind}` run that wrote {folder} (run "
                        f"{manifest.get('run_id')}): another run's leftover; {reader} reads only one run's files")  # fmt: skip
    return manifest


def read_yaml_mapping(path: str | Path, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is ``{}``); ERROR naming the file otherwise. The
    project's one YAML reader (:func:`parse_yaml_mapping` for a text already read)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise error(f"{path}: could not be read: {err}") from err
    return parse_yaml_mapping(text, str(path), error)


def parse_yaml_mapping(text: str, where: str, error: type[Exception] = ConfigError) -> dict[str, Any]:
    """TEXT as YAML whose top level is a mapping (empty is ``{}``); ERROR naming WHERE when it is not YAML or not a
    mapping."""
    import yaml

    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise error(f"{where}: could not be read: not valid YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise error(f"{where}: expected a mapping of keys to values at the top level.")
    return loaded


def short_name(name: str) -> str:
    """The last path component of a model or teacher name: ``models/Qwen2-1.5B`` -> ``Qwen2-1.5B``."""
    return str(name).rstrip("/").split("/")[-1]


def recorded_rank_config(scores: str, commit: str | None = None) -> tuple[dict | None, str]:
    """The resolved config `rank` recorded beside SCORES (a rank folder, its scores.parquet, or a Hub data set
    pushed with ``--kind scores``, read at COMMIT): (the config, or None when there is none; where it was looked
    for)."""
    path = Path(scores)
    if path.exists():
        recorded = (path if path.is_dir() else path.parent) / RANK_CONFIG
        return (read_yaml_mapping(recorded, DataError) if recorded.exists() else None), str(recorded)
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    where = f"{scores}@{commit or 'main'}:magpie_teach/{RANK_CONFIG}"
    try:
        local = hf_hub_download(scores, f"magpie_teach/{RANK_CONFIG}", repo_type="dataset", revision=commit)
    except EntryNotFoundError:
        return None, where
    return read_yaml_mapping(local, DataError), where


# ---- readers ---------------------------------------------------------------------------------------------
def sample_responses_path() -> str:
    """The shipped sample of teacher responses (long format, three tiny teachers), for the demo and tests."""
    from importlib import resources

    return str(resources.files("magpie_teach") / "resources" / "sample_responses.jsonl")


TEXT_COLUMNS = ("instruction", "response", "context")
"""The columns of a scores file that hold texts: :meth:`ScoresSource.keys` leaves them out."""


@dataclass
class ScoresSource:
    """One base model's per-example scores (a `rank` output folder, a scores parquet, or a Hub data set pushed with
    ``--kind scores``), read a batch at a time (:func:`magpie_teach.tables.open_table`): :meth:`keys` holds every
    column but the texts in memory, :meth:`rows` streams the texts of the rows asked for, so that a pass over 1.9M
    scored responses holds their numbers, never their texts."""

    table: Any
    name: str
    base_model: str

    @property
    def revision(self) -> str | None:
        """The Hub commit read (None for a local file)."""
        return self.table.revision

    def _batches(self, columns: list[str]) -> Iterator[Any]:
        """The rows of this base model (every row when ``base_model`` is empty: a table of one model's rows, without
        the column), with ``_pos``."""
        import numpy as np

        offset = 0
        for frame in self.table.frames([*columns, "base_model"]):
            mine = (
                (frame["base_model"] == self.base_model).to_numpy() if self.base_model else np.ones(len(frame), bool)
            )
            part = frame[mine].reset_index(drop=True)
            if "base_model" not in columns and "base_model" in part.columns:
                part = part.drop(columns="base_model")
            part["_pos"] = offset + np.flatnonzero(mine)
            offset += len(frame)
            yield part

    def instructions(self, keys: Any) -> Any:
        """One row per instruction of KEYS (rows of :meth:`keys`): its ``id`` and ``instruction`` text."""
        import pandas as pd

        first = keys.drop_duplicates("id")
        return pd.concat(list(self.rows(first["_pos"].to_numpy(), ["id", "instruction"])), ignore_index=True)

    def keys(self) -> Any:
        """Every column but :data:`TEXT_COLUMNS`, for this base model's rows, with ``_pos`` (the row's place in the
        source, which :meth:`rows` takes)."""
        import pandas as pd

        columns = [c for c in self.table.columns if c not in TEXT_COLUMNS]
        parts = list(self._batches(columns))
        keys = pd.concat(parts, ignore_index=True)
        keys.attrs["revision"] = self.revision
        return keys

    def rows(self, positions: Any, columns: list[str] | None = None) -> Iterator[Any]:
        """The rows at ``positions`` (``_pos`` values of :meth:`keys`) with ``columns`` (all when None) and ``_pos``,
        a batch at a time, in the source's order."""
        import numpy as np

        wanted = np.unique(np.asarray(positions, dtype=np.int64))
        columns = list(self.table.columns) if columns is None else columns
        for part in self._batches(columns):
            hit = np.isin(part["_pos"].to_numpy(), wanted)
            if hit.any():
                yield part[hit].reset_index(drop=True)

    def to_pandas(self) -> Any:
        """Every column of this base model's rows in memory (for the commands that read a sample of a run)."""
        import pandas as pd

        frame = pd.concat(list(self._batches(list(self.table.columns))), ignore_index=True).drop(columns="_pos")
        frame.attrs["revision"] = self.revision
        return frame


class RoutedResponses(ScoresSource):
    """A routed `generate` folder's responses (one teacher per instruction, its ``routing.csv`` beside them) read
    as :class:`ScoresSource` reads scores (no base model: every row): `select --strategy routed` takes them without
    a `rank` (which compares teachers on the same instructions, and these have none in common)."""


def open_routed_responses(folder: str | Path) -> RoutedResponses | None:
    """FOLDER's responses when it is a routed `generate` folder (a finished run with ``routing.csv``), else None."""
    from magpie_teach.tables import open_table

    folder = Path(folder)
    if not (folder.is_dir() and (folder / ROUTING).exists() and (folder / RESPONSES).exists()):
        return None
    verify_run(folder, "select")
    return RoutedResponses(open_table(str(folder / RESPONSES)), str(folder / RESPONSES), "")


def open_scores(path: str, base_model: str | None, revision: str | None = None) -> ScoresSource:
    """Opens the per-example scores of one base model (see :class:`ScoresSource`); the checks that need no text
    (the file, its columns, the base model) happen here, reading only the ``base_model`` column."""
    from magpie_teach.tables import open_table

    file = Path(path) / SCORES if Path(path).is_dir() else Path(path)
    if file.exists():
        verify_run(file.parent, "select")
        table, name = open_table(str(file)), str(file)
    elif path.count("/") == 1 and not path.startswith((".", "/")):
        table = open_table(path, revision=revision)
        name = f"{path}@{table.revision}"
    else:
        raise DataError(f"{path}: no scores.parquet (run `magpie-teach rank` first).")
    missing = [
        c for c in ("id", "instruction", "response", "teacher", "base_model", "reward", "compat_loss")
        if c not in table.columns
    ]  # fmt: skip
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}.")
    bases = list(dict.fromkeys(b for frame in table.frames(["base_model"]) for b in frame["base_model"].unique()))
    if not bases:
        raise DataError(f"{name}: no rows.")
    if base_model is None:
        if len(bases) > 1:
            raise ConfigError(f"{name} holds scores for several base models; choose one with --base-model: {bases}")
        base_model = bases[0]
    if base_model not in bases:

        def stem(name: str) -> str:  # a published name keeps the local folder's name before "@sha256:"
            return short_name(name).split("@sha256:")[0]

        short = [b for b in bases if short_name(b) == short_name(base_model)]
        short = short or [b for b in bases if stem(b) == stem(base_model)]
        if len(short) != 1:
            raise ConfigError(f"{name}: no scores for base model {base_model!r}; it has {bases}")
        base_model = short[0]
    return ScoresSource(table, name, base_model)


def load_scores(path: str, base_model: str | None, revision: str | None = None) -> Any:
    """Per-example scores of one base model as one DataFrame, texts included (``attrs["revision"]``: the Hub commit
    read); :func:`open_scores` reads them a batch at a time instead."""
    return open_scores(path, base_model, revision).to_pandas()


def read_rank_folder(rank_dir: str | os.PathLike) -> tuple[Any, Any, dict]:
    """(ranking, correlations or None, summary) of a `rank` output folder (or `generate`'s OUTPUT/rank)."""
    import pandas as pd

    rank_dir = Path(rank_dir)
    verify_run(rank_dir, "report and calibrate")
    ranking_path = rank_dir / RANKING
    if not ranking_path.exists():
        raise DataError(f"{rank_dir}: no ranking.csv; give the output folder of `magpie-teach rank`.")
    try:
        ranking = pd.read_csv(ranking_path)
    except (OSError, ValueError) as err:
        raise DataError(f"{ranking_path}: unreadable: {err}") from err
    missing = [c for c in ("teacher", "base_model", "car", "reward", "compat_loss") if c not in ranking]
    if missing:
        raise DataError(f"{ranking_path}: missing column(s) {missing}.")
    corr_path = rank_dir / CORRELATIONS
    corr = pd.read_csv(corr_path, index_col=0) if corr_path.exists() else None
    summary_path = rank_dir / RANK_SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    return ranking, corr, summary
