"""The scoring executor: every per-example score a verb needs, computed once and kept in the score cache.

`rank`, `generate`'s scoring stage (local and on Ray) and `probe` (live and replay) all score here, typed on
:class:`magpie_teach.settings.ScoringRunSettings` (the models, the model run's, the cluster's and the cache's
settings): per model, its stages (a reward model's reward; a causal LM's compatibility losses and L(x)), each
example looked up in the content-keyed score cache (:mod:`magpie_teach.scoring.cache`, the one resume store)
and only the rest scored, here (:mod:`magpie_teach.scoring.scorers`) or by a Ray Data actor pool
(:mod:`magpie_teach.scoring.on_ray`), in windows when the data is larger than memory. It writes no output folder
and never imports a verb.
"""

import gc
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.errors import DataError
from magpie_teach.scoring.metrics import short_name
from magpie_teach.settings import ScoringRunSettings

logger = logging.getLogger(__name__)


def score_caches(config: ScoringRunSettings, kinds: list[str], model: str, tokenizer: Any,
                 folder: Path | None = None) -> list:  # fmt: skip
    """The score cache of each of ``kinds``' scorers of ``model`` (:mod:`magpie_teach.scoring.cache`; the model
    named once for all of them); Nones with ``--no-cache``. A model whose weights cannot be named (a Hub id whose
    commit is unknown) is cached by its name under the run's FOLDER (``.score-cache``): a rerun into that folder
    resumes, and no other run reads those scores (the name alone does not say the weights are the same); Nones
    without a FOLDER."""
    from magpie_teach import artefacts
    from magpie_teach.scoring.cache import ScoreCache, default_cache_dir, model_identity, scorer_identity

    if not config.cache:
        return [None] * len(kinds)
    root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    model_id = model_identity(model, root)
    if model_id is None:
        if folder is None:
            return [None] * len(kinds)
        root, model_id = Path(folder) / artefacts.FOLDER_SCORE_CACHE, f"{model}@unknown-weights"
        logger.warning("%s: its weights cannot be named (no commit); its scores are kept in %s, for reruns into "
                       "this folder only", model, root)  # fmt: skip
    from magpie_teach.modeling import attention_for, dtype_for

    attention, dtype = attention_for(model), dtype_for(config.dtype, scoring_device(config))
    return [ScoreCache(root, scorer_identity(kind, model, model_id, tokenizer, config.max_length, dtype,
                                             attention)) for kind in kinds]  # fmt: skip


def scoring_device(config: ScoringRunSettings) -> str:
    """Where the scores are computed: on a Ray cluster the actors' (a GPU each with ``--gpus-per-worker``), else
    ``--device`` as this machine resolves it."""
    from magpie_teach.modeling import resolve_device

    if config.ray_address:
        return "cuda" if config.gpus_per_worker > 0 else "cpu"
    return resolve_device(config.device)


def _free() -> None:
    """Hands the GPU memory of what is no longer referenced back to the driver: torch's allocator keeps freed blocks
    for this process, where the next round's teachers and vLLM's engines, other processes, cannot use them. Called
    once the last reference is gone (a model still referenced frees nothing)."""
    gc.collect()  # models hold reference cycles: their tensors are freed here, not when the last name goes
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def contexts_of(rows: pd.DataFrame) -> list | None:
    """The earlier turns of multi-turn rows (a ``context`` column), else None."""
    return rows["context"].tolist() if "context" in rows.columns else None


@dataclass
class _Stage:
    """One scoring stage of one model: its ``kind`` (see :data:`magpie_teach.scoring.scorers.OUTPUTS`), the
    rows' texts, their score-cache keys, and the name its progress and ``work`` entry carry."""

    kind: str
    frame: pd.DataFrame
    keys: np.ndarray
    desc: str


class ScoringSession:
    """What scoring keeps across the calls of one run (`rank`'s windows, `probe`'s rounds): each model's tokenizer
    and score caches (named once), and the model being scored (loaded at its first miss, kept until another model
    is scored or :meth:`release`; a ``with`` block releases it at the end). FOLDER is the run's output folder: where
    the rows left to score are staged for a Ray cluster (every node reads it), and the score cache of a model whose
    weights cannot be named."""

    def __init__(self, folder: Path | None = None) -> None:
        self.caches: dict[tuple, tuple[Any, list]] = {}
        self.scorer: tuple[str, Any, Any] | None = None  # (model, scorer, tokenizer)
        self.quiet = False  # no "from the score cache" line per window
        self.folder = None if folder is None else Path(folder).resolve()

    def __enter__(self) -> "ScoringSession":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def staging_folder(self) -> Path:
        """Where the rows left to score are staged for a Ray cluster: in the run's folder, which every node reads."""
        from magpie_teach import artefacts

        if self.folder is None:
            raise ValueError("scoring on a Ray cluster needs the run's folder (ScoringSession(folder))")
        return self.folder / artefacts.RAY_STAGING

    def caches_of(self, config: ScoringRunSettings, model: str, kinds: list[str]) -> tuple[Any, list]:
        from magpie_teach.modeling import load_tokenizer

        if (model, *kinds) not in self.caches:
            tokenizer = load_tokenizer(model) if config.cache else None
            self.caches[(model, *kinds)] = (tokenizer, score_caches(config, kinds, model, tokenizer, self.folder))
        return self.caches[(model, *kinds)]

    def release(self) -> None:
        """Drops the loaded model and returns its GPU memory to the driver (see :func:`_free`)."""
        if self.scorer is not None:
            self.scorer = None  # the last reference: the model must be gone before the cache is emptied
            _free()

    def forget(self, model: str) -> None:
        """Drops ``model``'s tokenizer and score caches (whose entries a lookup reads into memory): a pass that is
        done with a model keeps none of its scores."""
        for key in [k for k in self.caches if k[0] == model]:
            del self.caches[key]


def _tally(work: dict | None, desc: str, scored: int, from_cache: int, say: bool = True, repeated: int = 0) -> None:
    """Counts a stage's examples scored and read from the score cache in ``work[desc]``, and (``repeated_in_run``,
    only when there are any) those that repeat an example this run scores once already (on Ray, an instruction
    whose answers fall in several windows: its L(x) is staged once); says how many came from the cache when any
    did."""
    if work is not None:
        done = work.setdefault(desc, {"scored": 0, "from_cache": 0})
        done["scored"] += scored
        done["from_cache"] += from_cache
        if repeated:
            done["repeated_in_run"] = done.get("repeated_in_run", 0) + repeated
    if from_cache and say:
        print(f"{desc}: {from_cache} of {scored + from_cache} from the score cache"
              f"{f', {scored} to score' if scored else ''}", file=sys.stderr, flush=True)  # fmt: skip


def _cached(config: ScoringRunSettings, model: str, stages: list[_Stage], work: dict | None,
            session: "ScoringSession") -> list[pd.DataFrame]:  # fmt: skip
    """Each stage's scores of every row of its frame, in order: those in the score cache read from it, the others
    scored (here, or on the Ray cluster with ``--ray-address``) and stored in the cache as each window ends;
    ``work[desc]`` counts both. The stages share ``model``: it is loaded once (once per Ray actor), and only
    when something is left to score; with a ``session`` (`rank`'s windows) it stays loaded for the next call."""
    from magpie_teach.scoring.scorers import OUTPUTS

    tokenizer, caches = session.caches_of(config, model, [stage.kind for stage in stages])
    results, todo = [], []
    for stage, cache in zip(stages, caches):
        found, values = cache.lookup(stage.keys) if cache is not None else (np.zeros(len(stage.keys), bool), None)
        missing = np.flatnonzero(~found)
        # `rank`'s last pass reads every score back: no news
        _tally(work, stage.desc, len(missing), int(found.sum()), say=not session.quiet)
        results.append((found, None if values is None else values.astype(OUTPUTS[stage.kind])))
        todo.append(missing)
    pending = [i for i, missing in enumerate(todo) if len(missing)]
    computed: dict[int, pd.DataFrame] = {}
    if pending and config.ray_address:
        from magpie_teach.scoring.compatibility import DEFAULT_WINDOW
        from magpie_teach.scoring.on_ray import Staging, shard_rows

        parts: list[list[pd.DataFrame]] = [[] for _ in pending]
        rows = shard_rows(sum(len(todo[i]) for i in pending), config.num_workers, DEFAULT_WINDOW)
        with Staging(session.staging_folder(), rows) as staging:
            for n, i in enumerate(pending):
                staging.add(n, stages[i].frame.iloc[todo[i]], stages[i].keys[todo[i]])
            _run_on_ray(config, model, [stages[i] for i in pending], [caches[i] for i in pending], staging,
                        lambda n, positions, scores: parts[n].append(scores.assign(_position=positions)))  # fmt: skip
        for n, i in enumerate(pending):
            frame = pd.concat(parts[n], ignore_index=True).sort_values("_position", kind="stable")
            computed[i] = frame.drop(columns="_position").reset_index(drop=True)
    elif pending:
        from magpie_teach.scoring.scorers import load_scorer, load_scorer_model, score_frame

        if session.scorer is not None and session.scorer[0] == model:
            _, scorer, tokenizer = session.scorer
        else:
            session.release()  # one model in memory at a time
            if tokenizer is None:
                scorer, tokenizer = load_scorer(stages[pending[0]].kind, model, config.dtype, config.device)
            else:  # the one the cache identity was read from
                scorer = load_scorer_model(stages[pending[0]].kind, model, config.dtype, config.device)
            session.scorer = (model, scorer, tokenizer)
        for i in pending:
            stage, keys, cache = stages[i], stages[i].keys[todo[i]], caches[i]

            def on_window(start: int, rows: pd.DataFrame, keys: np.ndarray = keys, cache: Any = cache) -> None:
                if cache is not None:
                    cache.add(keys[start : start + len(rows)], rows)

            computed[i] = score_frame(stage.kind, scorer, tokenizer, stage.frame.iloc[todo[i]], config.max_length,
                                      config.batch_tokens, on_window=on_window, desc=stage.desc)  # fmt: skip
            if "padding_fraction" in computed[i].attrs:
                logger.info("%s: padding was %.1f%% of computed tokens", stage.desc,
                            100 * computed[i].attrs["padding_fraction"])  # fmt: skip
    out = []
    for i, (found, values) in enumerate(results):
        if i not in computed:
            out.append(values)
            continue
        scores = computed[i].reset_index(drop=True)
        if values is not None:
            order = np.argsort(np.concatenate([np.flatnonzero(found), todo[i]]), kind="stable")
            scores = pd.concat([values, scores], ignore_index=True).iloc[order].reset_index(drop=True)
        out.append(scores)
    return out


def instruction_features(config: ScoringRunSettings, model: str, rows: pd.DataFrame, work: dict | None,
                         session: "ScoringSession") -> pd.DataFrame:  # fmt: skip
    """The router's features of each instruction of ROWS under base model MODEL (:mod:`magpie_teach.scoring.features`:
    one row per instruction ``id``, ``f0`` .. ``f63``), through the score cache like every other score."""
    from magpie_teach.scoring.cache import example_keys

    instructions = rows.drop_duplicates("id")[["id", "instruction"]].reset_index(drop=True)
    stage = _Stage("instruction-features", instructions, example_keys(instructions["instruction"].tolist()),
                   f"features {short_name(model)}")  # fmt: skip
    (features,) = _cached(config, model, [stage], work, session)
    return pd.concat([instructions[["id"]], features.reset_index(drop=True)], axis=1)


def stages_of(model: str, kinds: list[str], rows: pd.DataFrame, keys: np.ndarray) -> list[_Stage]:
    """The scoring stages of ``model`` over a frame of validated rows (whose score-cache keys are ``keys``): the
    reward model's one, or a causal LM's compatibility losses and L(x) (one row per instruction, with its ``id``)."""
    from magpie_teach.scoring.cache import example_keys

    texts = rows[["instruction", "response", *(["context"] if "context" in rows.columns else [])]]
    if kinds == ["reward"]:
        return [_Stage("reward", texts, keys, "reward")]
    short = short_name(model)
    instructions = rows.drop_duplicates("id")[["id", "instruction"]].reset_index(drop=True)
    return [_Stage("compat", texts, keys, f"compat {short}"),
            _Stage("instruction-loss", instructions, example_keys(instructions["instruction"].tolist()),
                   f"L(x) {short}")]  # fmt: skip


def _run_on_ray(config: ScoringRunSettings, model: str, stages: list[_Stage], caches: list, staging: Any,
                on_scores: Any = None) -> None:  # fmt: skip
    """Scores the rows ``staging`` holds (stage ``n`` of them one of ``stages``) on the Ray cluster, stores each
    block in its stage's cache (when there is one) as it arrives, and passes it to ``on_scores(n, positions,
    scores)``."""
    from magpie_teach.progress import Progress
    from magpie_teach.scoring.on_ray import connect, score_on_ray

    connect(config.ray_address)
    bars = {n: Progress(count, stages[n].desc, position=p) for p, (n, count) in enumerate(sorted(staging.counts.items()))}  # fmt: skip

    def on_block(n: int, positions: np.ndarray, keys: np.ndarray, rows: pd.DataFrame) -> None:
        if caches[n] is not None:
            caches[n].add(keys, rows)
        bars[n].update(len(positions))
        if on_scores is not None:
            on_scores(n, positions, rows)

    score_on_ray(model, [stage.kind for stage in stages], staging, num_workers=config.num_workers,
                 gpus_per_worker=config.gpus_per_worker, max_length=config.max_length,
                 batch_tokens=config.batch_tokens, dtype=config.dtype, on_block=on_block)  # fmt: skip
    for bar in bars.values():
        bar.close()


def lm_scores(config: ScoringRunSettings, model_name: str, rows: pd.DataFrame, keys: np.ndarray,
               work: dict | None, session: "ScoringSession") -> pd.DataFrame:  # fmt: skip
    """Per-example losses of one causal LM: compat_loss, uncond_loss, instruction loss, token counts."""
    stages = stages_of(model_name, ["compat", "instruction-loss"], rows, keys)
    scores, text = _cached(config, model_name, stages, work, session)
    instructions = stages[1].frame
    empty = scores["n_tokens"].to_numpy() == 0
    if empty.any():  # the prompt alone filled max_length: no response token left to score
        bad = rows.loc[empty, ["id", "teacher"]].head(3).to_dict("records")
        raise DataError(
            f"{model_name}: {int(empty.sum())} conversation(s) keep no response token within --max-length "
            f"{config.max_length} (e.g. {bad}); raise --max-length or drop those instructions."
        )
    scores["instr_loss"] = rows["id"].map(dict(zip(instructions["id"], text["loss"]))).to_numpy()
    return scores


def rewards(config: ScoringRunSettings, rows: pd.DataFrame, keys: np.ndarray, work: dict | None,
            session: "ScoringSession") -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(rewards, truncated): a precomputed column, or the reward model's scores."""
    if config.reward_column is not None:
        return rows[config.reward_column].to_numpy(dtype=np.float64), np.zeros(len(rows), dtype=bool)
    (scores,) = _cached(
        config, config.reward_model, stages_of(config.reward_model, ["reward"], rows, keys), work, session
    )
    return scores["reward"].to_numpy(dtype=np.float64), scores["truncated"].to_numpy(dtype=bool)


LM_COLUMNS = ("compat_loss", "n_tokens", "n_tokens_full", "truncated", "uncond_loss", "instr_loss")
"""What one base model contributes per example (`score_compatibility` plus the instruction loss L(x))."""


def example_scores(rows: pd.DataFrame, lm: pd.DataFrame, base_model: str) -> pd.DataFrame:
    """The rows of ``scores.parquet`` for one base model: ``rows`` (key, texts, ``reward``,
    ``reward_truncated``) with that model's :data:`LM_COLUMNS` (aligned row by row) and the per-example
    baselines derived from them. `rank` and the scoring stage of `generate` both build their scores here."""
    from magpie_teach.scoring.metrics import ic_ifd, ifd

    frame = rows.assign(base_model=base_model)
    for column in LM_COLUMNS:
        frame[column] = lm[column].to_numpy()
    frame["logprob_norm"] = -frame["compat_loss"]
    frame["ppl_self"] = np.exp(frame["compat_loss"])
    frame["ifd_self"] = ifd(frame["compat_loss"], frame["uncond_loss"])
    frame["ic_ifd_self"] = ic_ifd(frame["compat_loss"], frame["instr_loss"], frame["uncond_loss"])
    return frame


def window_rows(config: ScoringRunSettings, n_rows: int, session: ScoringSession) -> int:
    """Rows scored per window: :data:`magpie_teach.data.WINDOW_ROWS`, or all of them where the score cache cannot
    carry scores from one pass to the next (``--no-cache``, a model whose identity is unknown)."""
    from magpie_teach import data

    if not config.cache or data.WINDOW_ROWS <= 0 or n_rows <= data.WINDOW_ROWS:
        return n_rows
    for model, kinds in scoring_models(config):
        _, caches = session.caches_of(config, model, kinds)
        if any(cache is None for cache in caches):
            logger.warning("%s: no score-cache identity; every response is scored in memory at once", model)
            return n_rows
    return data.WINDOW_ROWS


def scoring_models(config: ScoringRunSettings) -> list[tuple[str, list[str]]]:
    """Each model `rank` runs with the kinds of its scorers, in the order they run."""
    models = [(config.reward_model, ["reward"])] if config.reward_model else []
    models += [
        (m, ["compat", "instruction-loss"]) for m in filter(None, [config.reference_model, *config.base_models])
    ]
    return models


def fill_cache(config: ScoringRunSettings, model: str, kinds: list[str], rows: pd.DataFrame, work: dict,
          session: ScoringSession) -> None:  # fmt: skip
    """Scores into the score cache what it lacks of one window under ``model``, through the stages
    :func:`score_rows` reads them back with."""
    from magpie_teach.scoring.cache import example_keys

    keys = example_keys(rows["instruction"].tolist(), rows["response"].tolist(), contexts_of(rows))
    if kinds == ["reward"]:
        rewards(config, rows, keys, work, session)
    else:
        lm_scores(config, model, rows, keys, work, session)


def fill_cache_on_ray(config: ScoringRunSettings, model: str, kinds: list[str], stream: Any, window: int, work: dict,
                 session: ScoringSession) -> None:  # fmt: skip
    """Scores into the score cache what it lacks of every window under ``model``, on the Ray cluster: a window at a
    time, the rows the cache lacks are staged (an instruction once, though its answers fall in several windows),
    then one Ray Data pipeline scores them all, so that each actor loads the model once."""
    from magpie_teach.scoring.cache import example_keys
    from magpie_teach.scoring.compatibility import DEFAULT_WINDOW
    from magpie_teach.scoring.on_ray import Staging, shard_rows

    _, caches = session.caches_of(config, model, kinds)
    staged: set = set()  # L(x) keys staged already
    stages: list[_Stage] = []
    seen: dict[str, list[int]] = {}
    rows_per_shard = shard_rows(stream.n_rows * len(kinds), config.num_workers, DEFAULT_WINDOW)
    with Staging(session.staging_folder(), rows_per_shard) as staging:
        for rows in stream.windows(window):
            keys = example_keys(rows["instruction"].tolist(), rows["response"].tolist(), contexts_of(rows))
            stages = stages_of(model, kinds, rows, keys)
            for n, (stage, cache) in enumerate(zip(stages, caches)):
                found, _ = cache.lookup(stage.keys)
                repeat = np.zeros(len(stage.keys), bool)
                if stage.kind == "instruction-loss":  # staged by an earlier window: scored once, not read back
                    repeat = ~found & np.fromiter((key in staged for key in stage.keys), bool, len(stage.keys))
                    staged.update(stage.keys[~found & ~repeat])
                todo = ~found & ~repeat
                staging.add(n, stage.frame.iloc[np.flatnonzero(todo)], stage.keys[todo])
                counted = seen.setdefault(stage.desc, [0, 0, 0])
                counted[0] += int(todo.sum())
                counted[1] += int(found.sum())
                counted[2] += int(repeat.sum())
        for desc, (scored, from_cache, repeated) in seen.items():
            _tally(work, desc, scored, from_cache, repeated=repeated)
        _run_on_ray(config, model, stages, caches, staging)


def truncation_counts(config: ScoringRunSettings, scores: pd.DataFrame) -> dict[str, int]:
    """How many examples the reward model, and each base model, saw cut at ``max_length`` (summary.json's counts)."""
    first = scores[scores["base_model"] == config.base_models[0]]
    counts = {"reward_truncated": int(first["reward_truncated"].sum())}
    for base in config.base_models:
        counts[f"truncated[{base}]"] = int(scores.loc[scores["base_model"] == base, "truncated"].sum())
    return counts


def score_rows(
    config: ScoringRunSettings, rows: pd.DataFrame, work: dict | None, session: "ScoringSession"
) -> pd.DataFrame:
    """Per-example scores of validated long-format ``rows`` under every base model of ``config`` (the rows of
    ``scores.parquet``): the reward (model or column), each base model's losses, the reference model's
    baselines. `rank` scores its data here, and `probe` each round's new responses. Every score is read from
    the score cache when it holds it; ``work`` gets, per stage, how many examples were scored and read."""
    from magpie_teach.data import carried_columns, text_columns
    from magpie_teach.scoring.cache import example_keys
    from magpie_teach.scoring.metrics import ic_ifd, ifd

    keys = example_keys(rows["instruction"].tolist(), rows["response"].tolist(), contexts_of(rows))

    base_rows = rows[text_columns(rows) + carried_columns(rows)].copy()
    base_rows["reward"], base_rows["reward_truncated"] = rewards(config, rows, keys, work, session)
    reference = None
    if config.reference_model:
        ref = lm_scores(config, config.reference_model, rows, keys, work, session)
        reference = pd.DataFrame(
            {
                "loss_ref": ref["compat_loss"],
                "ppl_ref": np.exp(ref["compat_loss"]),
                "ifd_ref": ifd(ref["compat_loss"], ref["uncond_loss"]),
                "ic_ifd_ref": ic_ifd(ref["compat_loss"], ref["instr_loss"], ref["uncond_loss"]),
            }
        )
    frames = []
    for base in config.base_models:
        frame = example_scores(base_rows, lm_scores(config, base, rows, keys, work, session), base)
        if reference is not None:
            frame = pd.concat([frame.reset_index(drop=True), reference], axis=1)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
