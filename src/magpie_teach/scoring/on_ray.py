"""Scoring on a Ray cluster: Ray Data runs the same scorer code as the local path, one model per actor.

The driver (the `rank` process) keeps what it does locally: it reads and validates the data, samples, looks
every example up in the score cache (:mod:`magpie_teach.scoring.cache`) and aggregates. What is left to score
goes to Ray Data as blocks of rows (a base model's two stages, its compatibility losses and L(x), in one
dataset, so that its actors load it once); ``map_batches`` sends them through an actor pool (``num_workers`` actors,
each with ``gpus_per_worker`` GPUs, or one CPU) whose actors load the model once and call
:func:`magpie_teach.scoring.scorers.score_frame`, the function the local path calls: the same template
decision, the same masks, the same length-sorted token-budgeted batches. Results stream back to the driver,
which stores each block in the score cache as it arrives, so a driver killed mid-run resumes from the blocks
already stored. Ray restarts an actor whose process dies and retries its block (Ray Data's defaults:
``max_restarts=-1``, ``max_task_retries=-1``); scores do not depend on batching, so a retried block gives the
same numbers.

Every node needs magpie-teach installed (``pip install 'magpie-teach[ray]'``) and the models: a Hub id is
downloaded by each node (or read from its Hugging Face cache); a local folder must be on storage every node
sees at the same path.
"""

import logging
import math
import os
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.errors import ConfigError

logger = logging.getLogger(__name__)

BATCHES_PER_WORKER = 4
"""At least this many blocks per actor (of at most one window each), so that every actor stays busy and a
retried block repeats little work."""


def resolve_address(address: str) -> str:
    """``auto`` is ``$RAY_ADDRESS`` when set (else Ray's own ``auto``: the cluster this machine joined)."""
    if address == "auto":
        return os.environ.get("RAY_ADDRESS") or "auto"
    return address


def check_cluster(address: str, timeout: float = 5.0) -> str:
    """Connects to the cluster at ADDRESS; a ConfigError in one line, before any model loads, when the ``ray``
    extra is missing or the cluster cannot be reached (a TCP connection to its host and port first, so that a
    wrong address fails in seconds); returns the address connected to."""
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise ConfigError(
            "--ray-address needs Ray Data: pip install 'magpie-teach[ray]' (on every node of the cluster)"
        ) from None
    address = resolve_address(address)
    if address != "auto":
        _reachable(address, timeout)
    try:
        connect(address)
    except (ConnectionError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"--ray-address {address}: could not join the Ray cluster ({first})") from None
    return address


def _reachable(address: str, timeout: float) -> None:
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address!r}: expected host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout):
            pass
    except OSError as err:
        raise ConfigError(
            f"--ray-address {address}: the Ray cluster cannot be reached ({err.strerror or err})"
        ) from None


def connect(address: str) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own progress line reports the stage
    context.print_on_execution_start = False


class _Scorer:
    """A Ray Data actor: loads one model when it starts and scores the blocks it is given, each row with the
    stage its ``_stage`` names (several stages of one model share the actor: the model is loaded once)."""

    def __init__(self, model: str, kinds: list[str], settings: dict):
        import torch

        from magpie_teach.scoring.scorers import load_scorer

        if settings["threads"]:
            torch.set_num_threads(settings["threads"])
        self.kinds, self.settings = kinds, settings
        self.columns = _union_columns(kinds)
        self.model, self.tokenizer = load_scorer(kinds[0], model, settings["dtype"], settings["device"])

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from magpie_teach.scoring.scorers import score_frame

        parts = []
        for stage, rows in batch.groupby("_stage", sort=True):
            scores = score_frame(self.kinds[int(stage)], self.model, self.tokenizer, rows, self.settings["max_length"],
                                 self.settings["batch_tokens"], show_progress=False)  # fmt: skip
            # one schema for every block: each stage's columns as float64 (exact for its counts and flags)
            parts.append(scores.astype("float64").reindex(columns=self.columns)
                         .assign(_stage=int(stage), _position=rows["_position"].to_numpy()))  # fmt: skip
        return pd.concat(parts, ignore_index=True)


def _union_columns(kinds: list[str]) -> list[str]:
    from magpie_teach.scoring.scorers import OUTPUTS

    return list(dict.fromkeys(column for kind in kinds for column in OUTPUTS[kind]))


def score_on_ray(
    model: str,
    stages: list[tuple[str, pd.DataFrame]],
    *,
    num_workers: int,
    gpus_per_worker: float,
    max_length: int,
    batch_tokens: int,
    dtype: str,
    on_block: Any,
    window: int,
) -> list[pd.DataFrame]:
    """Scores the rows of each (kind, frame) of ``stages`` (the texts :func:`score_frame` reads) under one
    ``model`` on the connected cluster, through one actor pool; calls ``on_block(stage, positions, scores)`` as
    each block's scores arrive; returns each stage's scores in its frame's order."""
    import ray.data

    from magpie_teach.scoring.scorers import OUTPUTS

    kinds = [kind for kind, _ in stages]
    if len({kind == "reward" for kind in kinds}) > 1:
        raise ValueError(f"one model scores either rewards or losses, not both: {kinds}")
    rows = pd.concat([frame.reset_index(drop=True).assign(_stage=i, _position=np.arange(len(frame)))
                      for i, (_, frame) in enumerate(stages)], ignore_index=True)  # fmt: skip
    batch = max(1, min(window, math.ceil(len(rows) / (num_workers * BATCHES_PER_WORKER))))
    blocks = [rows.iloc[start : start + batch] for start in range(0, len(rows), batch)]
    settings = {"max_length": max_length, "batch_tokens": batch_tokens, "dtype": dtype,
                "device": "cuda" if gpus_per_worker > 0 else "cpu", "threads": 0 if gpus_per_worker > 0 else 1}  # fmt: skip
    resources = {"num_gpus": gpus_per_worker} if gpus_per_worker > 0 else {"num_cpus": 1}
    scored = ray.data.from_pandas(blocks).map_batches(
        _Scorer,
        fn_constructor_args=(model, kinds, settings),
        batch_size=batch,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        **resources,
    )
    parts: list[list[pd.DataFrame]] = [[] for _ in stages]
    for block in scored.iter_batches(batch_size=None, batch_format="pandas"):
        for stage, part in block.groupby("_stage", sort=True):
            stage = int(stage)
            positions = part["_position"].to_numpy()
            scores = part[list(OUTPUTS[kinds[stage]])].astype(OUTPUTS[kinds[stage]]).reset_index(drop=True)
            on_block(stage, positions, scores)
            parts[stage].append(scores.assign(_position=positions))
    out = []
    for kind, stage_parts in zip(kinds, parts):
        if not stage_parts:
            out.append(pd.DataFrame({c: pd.Series(dtype=t) for c, t in OUTPUTS[kind].items()}))
            continue
        frame = pd.concat(stage_parts, ignore_index=True).sort_values("_position")
        out.append(frame.drop(columns="_position").reset_index(drop=True))
    return out
