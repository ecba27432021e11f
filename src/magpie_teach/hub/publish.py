"""``magpie-teach push``: an artefact folder -> one Hub commit (data, dataset card, resolved config) + a tag.

Everything that can be checked is checked before the first byte goes up: the repo id, the source
folder and its files, the card's fields, and the tag (an existing tag is refused unless
``overwrite``). The commit names its parent, so a concurrent push is refused rather than merged. A
push that dies midway leaves the previous version untouched (a Hub commit is atomic) and the local
folder as it was; rerunning it uploads only what is missing (LFS objects already stored are
skipped) and, if the commit had landed, only creates the tag.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from magpie_teach.artefacts import COMMAND_FILE, KINDS, SFT_DATA, content_digest, detect_kind, verify_run
from magpie_teach.errors import ConfigError, DataError, network_errors
from magpie_teach.hub import cards

SEMVER = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")


@dataclass
class PushConfig:
    source: str = field(
        metadata={"help": "Output folder of magpie-teach generate, rank or select.", "positional": True}
    )
    repo_id: str = field(metadata={"help": "Hub data set to publish to, ORG/NAME (created if missing)."})
    tag: str | None = field(
        default=None, metadata={"help": "Tag of this version (default: the next minor version, v1.0.0 first)."}
    )
    kind: str | None = field(
        default=None,
        metadata={
            "help": "Artefact to publish from SOURCE (default: responses for generate, ranking for rank, sft for select).",
            "choices": sorted(KINDS),
        },
    )
    private: bool = field(default=False, metadata={"help": "Create the repo private (an existing repo keeps its visibility)."})  # fmt: skip
    overwrite: bool = field(
        default=False, metadata={"help": "Allow moving an existing tag to this push. Without it, an existing tag is an error."}
    )  # fmt: skip
    branch: str = field(default="main", metadata={"help": "Branch to commit to."})
    license: str = field(
        default="other",
        metadata={"help": "License in the card's metadata (default 'other': responses follow the teachers' terms)."},
    )
    message: str | None = field(default=None, metadata={"help": "Commit message (default: 'magpie-teach: KIND TAG')."})  # fmt: skip
    timeout: float = field(
        default=300.0,
        metadata={"help": "Seconds a Hub request may wait for an answer before the push stops (and can be rerun)."},
    )


@dataclass
class PushResult:
    repo_id: str
    tag: str
    commit: str
    kind: str
    url: str
    files: list[str]
    unchanged: bool

    @property
    def reference(self) -> str:
        return f"{self.repo_id}@{self.tag} (commit {self.commit})"


# ---- validation that happens before anything is uploaded ---------------------------------------------
def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if repo_id.count("/") != 1:
        raise ConfigError(f"--repo-id {repo_id!r}: expected ORG/NAME (for example my-org/magpie-responses).")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ConfigError(f"--repo-id {repo_id!r}: {err}") from None


def check_tag(tag: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", tag):
        raise ConfigError(f"--tag {tag!r}: use letters, digits, '.', '_' and '-' (for example v1.2.0).")


def next_tag(existing: list[str]) -> str:
    """The next minor version after the highest vX.Y.Z tag; v1.0.0 when there is none."""
    versions = [tuple(map(int, m.groups())) for m in map(SEMVER.match, existing) if m]
    if not versions:
        return "v1.0.0"
    major, minor, _ = max(versions)
    return f"v{major}.{minor + 1}.0"


def stage(source: Path, kind: str, repo_id: str, tag: str, license: str, workdir: Path) -> dict[str, Path]:
    """Writes what will be committed (path in repo -> local file); the source folder is only read. Local paths
    in what is published become public names (:mod:`magpie_teach.hub.provenance`); the folder keeps them."""
    import pandas as pd

    from magpie_teach.hub.provenance import Publisher, collect_strings

    spec = KINDS[kind]
    workdir.mkdir(parents=True, exist_ok=True)
    context, card_data, frame = cards.build_context(source, kind, repo_id, tag)
    card_data["license"] = license
    side = [
        name for name in (spec.config, spec.summary, COMMAND_FILE, *spec.extras) if name and (source / name).exists()
    ]
    inside = source.resolve()
    for name in (spec.data, *side):  # what is published is the folder's own: no link out of it
        path = source / name
        if path.is_symlink() or inside not in path.resolve().parents:
            raise DataError(f"{path}: a symbolic link to {path.resolve()}; push publishes only files that are in "
                            f"the folder itself: copy the file in instead of linking it")  # fmt: skip
    publisher = Publisher()
    for name in side:
        if Path(name).suffix in (".json", ".yaml", ".yml"):
            publisher.learn(collect_strings(cards.yaml_or_json(source / name)))
        elif Path(name).suffix == ".csv":  # a table's strings (performance.csv's student models, say)
            publisher.learn_frame(pd.read_csv(source / name))
    files: dict[str, Path] = {}
    data = source / spec.data
    public = publisher.rewrite_frame(frame)
    if data.suffix == ".parquet" and public is None:
        files[SFT_DATA] = data
    else:
        converted = workdir / "train.parquet"
        (frame if public is None else public).to_parquet(converted, index=False)
        files[SFT_DATA] = converted
    for name in side:  # side files: local paths replaced in the published copy
        path, copy = source / name, workdir / "side" / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
            rewritten = publisher.rewrite_frame(table)
            (table if rewritten is None else rewritten).to_parquet(copy, index=False)
        elif path.suffix == ".csv":
            table = pd.read_csv(path)
            rewritten = publisher.rewrite_frame(table)
            if rewritten is None:
                copy.write_bytes(path.read_bytes())
            else:
                rewritten.to_csv(copy, index=False)
        else:
            copy.write_text(publisher.rewrite(path.read_text(encoding="utf-8")), encoding="utf-8")
        files[f"magpie_teach/{name}"] = copy
    card = workdir / "README.md"
    card.write_text(publisher.rewrite(cards.render(kind, context, card_data, str(source))), encoding="utf-8")
    files["README.md"] = card
    return files


def git_blob_sha(path: Path) -> str:
    import hashlib

    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def same_files(api: Any, repo_id: str, commit: str, files: dict[str, Path]) -> bool:
    """Whether COMMIT holds exactly FILES (plus .gitattributes), byte for byte."""
    remote = {e.path: e for e in api.list_repo_tree(repo_id, repo_type="dataset", revision=commit, recursive=True)
              if hasattr(e, "blob_id")}  # fmt: skip
    if set(remote) - {".gitattributes"} != set(files):
        return False
    for path, local in files.items():
        entry = remote[path]
        if entry.lfs is not None:
            if entry.lfs.sha256 != content_digest(local):
                return False
        elif entry.blob_id != git_blob_sha(local):
            return False
    return True


# ---- the push -----------------------------------------------------------------------------------------
def push(config: PushConfig) -> PushResult:
    """Publishes CONFIG.source; errors of the Hub or the network become a DataError that says what state the
    repo is in (the previous version untouched) and that rerunning the same command finishes the push."""
    try:
        return _push(config)
    except network_errors() as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        what = f"HTTP {status}" if status else type(err).__name__
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DataError(
            f"push of {config.source} to {config.repo_id} failed ({what}: {first}). Nothing was published by this "
            "attempt (a Hub commit is all or nothing); the previous versions and your local files are untouched. "
            "Rerun the same command to finish: files already uploaded are not sent again."
        ) from None


def _push(config: PushConfig) -> PushResult:
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    from magpie_teach.hub.target import hub_token

    check_repo_id(config.repo_id)
    if config.tag:
        check_tag(config.tag)
    source = Path(config.source)
    kind = detect_kind(source, config.kind)
    verify_run(source, "push")  # one finished run's files, or nothing is published
    api = HfApi(token=hub_token())
    _set_timeout(config.timeout)

    try:
        refs = api.list_repo_refs(config.repo_id, repo_type="dataset")
        tags = {t.name: t.target_commit for t in refs.tags}
        branches = {b.name: b.target_commit for b in refs.branches}
        exists = True
    except RepositoryNotFoundError:
        tags, branches, exists = {}, {}, False
    tag = config.tag or next_tag(list(tags))
    if exists and config.branch not in branches:
        raise ConfigError(f"{config.repo_id}: no branch {config.branch!r} (branches: {', '.join(sorted(branches))}).")

    def published(name: str, commit: str, files: dict) -> PushResult:
        url = f"{api.endpoint}/datasets/{config.repo_id}/tree/{name}"
        return PushResult(config.repo_id, name, commit, kind, url, sorted(files), True)

    with tempfile.TemporaryDirectory(prefix="magpie-teach-push-") as tmp:
        files = stage(source, kind, config.repo_id, tag, config.license, Path(tmp))  # card errors happen here
        if tag in tags and not config.overwrite:
            if same_files(api, config.repo_id, tags[tag], files):  # a rerun of the same push: nothing to do
                return published(tag, tags[tag], files)
            raise ConfigError(
                f"{config.repo_id}: tag {tag} already exists (commit {tags[tag][:12]}) with other content; published versions are never "
                "overwritten. Pick another --tag, or pass --overwrite to move it."
            )
        if exists and not config.tag:  # the same artefact again: name the version that already holds it
            head = branches[config.branch]
            for name in sorted(name for name, sha in tags.items() if sha == head):
                again = stage(source, kind, config.repo_id, name, config.license, Path(tmp) / name)
                if same_files(api, config.repo_id, head, again):
                    return published(name, head, again)
        if exists:
            head = branches[config.branch]
        else:
            api.create_repo(config.repo_id, repo_type="dataset", private=config.private, exist_ok=True)
            head = api.repo_info(config.repo_id, repo_type="dataset", revision=config.branch).sha
        if exists and same_files(api, config.repo_id, head, files):
            # an earlier attempt committed exactly this artefact and stopped before tagging (its client timed out
            # while the Hub finished the commit, say): tag that commit instead of committing the same files again
            commit = head
        else:
            remote = set(api.list_repo_files(config.repo_id, repo_type="dataset", revision=head))
            operations: list[Any] = [CommitOperationAdd(path, str(local)) for path, local in sorted(files.items())]
            operations += [CommitOperationDelete(p) for p in sorted(remote - set(files) - {".gitattributes"})]
            commit = api.create_commit(
                config.repo_id,
                operations,
                commit_message=config.message or f"magpie-teach: {kind} {tag}",
                commit_description=f"Published by magpie-teach push from {source.name}/.",
                repo_type="dataset",
                revision=config.branch,
                parent_commit=head,
            ).oid
    unchanged = commit == head and tag in tags
    if tag in tags:  # --overwrite
        api.delete_tag(config.repo_id, tag=tag, repo_type="dataset")
    try:
        api.create_tag(
            config.repo_id, tag=tag, revision=commit, repo_type="dataset", tag_message=f"magpie-teach {kind}"
        )
    except RevisionNotFoundError as err:  # pragma: no cover - the commit was just made
        raise DataError(f"{config.repo_id}: commit {commit} vanished before tagging: {err}") from None
    except network_errors() as err:  # the files are on the branch: say so, not "nothing was published"
        status = getattr(getattr(err, "response", None), "status_code", None)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(
            f"push of {config.source} to {config.repo_id}: the files were committed to {config.branch} (commit "
            f"{commit[:12]}), but tag {tag} could not be created ({f'HTTP {status}: ' if status else ''}{first}; "
            "another push may have taken it). The version is published untagged; rerun the same command to tag it."
        ) from None
    url = f"{api.endpoint}/datasets/{config.repo_id}/tree/{tag}"
    return PushResult(config.repo_id, tag, commit, kind, url, sorted(files), unchanged)


def _set_timeout(seconds: float) -> None:
    """Gives huggingface_hub's shared HTTP client a timeout (its default waits forever on a stalled server)."""
    from huggingface_hub import get_session

    session = get_session()
    session.timeout = type(session.timeout)(seconds)
