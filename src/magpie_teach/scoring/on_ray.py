"""Scoring on a Ray cluster: Ray Data runs the same scorer code as the local path, one model per actor.

The driver (the `rank` process) keeps what it does locally: it reads and validates the data a window at a
time, samples, looks every example up in the score cache (:mod:`magpie_teach.scoring.cache`) and aggregates.
What is left to score under a model is staged as parquet shards in the output folder (:class:`Staging`; the
driver holds one shard at a time, whatever the size of the data; a base model's two stages, its
compatibility losses and L(x), in one set of shards, so that its actors load it once). Ray Data's tasks read
the shards (a block each) where they run, and ``map_batches`` sends them through an actor pool
(``num_workers`` actors, each with ``gpus_per_worker`` GPUs, or one CPU) whose actors load the model once and call
:func:`magpie_teach.scoring.scorers.score_frame`, the function the local path calls: the same template
decision, the same masks, the same length-sorted token-budgeted batches. Results stream back to the driver,
which stores each block in the score cache as it arrives, so a driver killed mid-run resumes from the blocks
already stored; the shards are removed when the model is done. Ray restarts an actor whose process dies and
retries its block (Ray Data's defaults: ``max_restarts=-1``, ``max_task_retries=-1``); scores do not depend on
batching, so a retried block gives the same numbers.

Every node needs magpie-teach installed (``pip install 'magpie-teach[ray]'``) and the models: a Hub id is
downloaded by each node (or read from its Hugging Face cache); a local folder must be on storage every node
sees at the same path, and so must the output folder (:func:`check_cluster` asks every node before any
model loads).
"""

import logging
import math
import os
from pathlib import Path
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


def check_cluster(address: str, output_dir: str | os.PathLike, gpus_per_worker: float = 0.0, num_workers: int = 1,
                  timeout: float = 5.0) -> str:  # fmt: skip
    """Connects to the cluster at ADDRESS; a ConfigError in one line, before any model loads, when the ``ray``
    extra is missing, the cluster cannot be reached (a TCP connection to its host and port first, so that a
    wrong address fails in seconds), it has fewer GPUs than ``num_workers`` actors of ``gpus_per_worker`` each
    need (Ray Data would wait for ever for actors it cannot place, their logs hidden) or a node cannot read
    ``output_dir`` (:func:`check_visible`); returns the address connected to."""
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
    check_gpus(cluster_gpus(), gpus_per_worker, num_workers, address)
    check_visible(Path(output_dir))
    return address


def cluster_gpus() -> list[float]:
    """The GPUs of each alive node of the Ray cluster this driver is connected to."""
    import ray

    return [float(node["Resources"].get("GPU", 0)) for node in ray.nodes() if node.get("Alive")]


def check_gpus(nodes: list[float], gpus_per_worker: float, num_workers: int, address: str) -> None:
    """A ConfigError when NUM_WORKERS actors of GPUS_PER_WORKER GPUs each cannot all be placed on a cluster whose
    alive nodes have NODES GPUs (in all, or one actor on its largest node): Ray Data would wait for ever for them,
    their logs hidden. A warning when the cluster has GPUs that a CPU run (``--gpus-per-worker 0``) leaves idle."""
    there, asked = sum(nodes), num_workers * gpus_per_worker
    if gpus_per_worker == 0:
        if there:
            logger.warning("the Ray cluster at %s has %g GPU(s) but --gpus-per-worker 0 scores on its CPUs, many times "
                           "slower: --gpus-per-worker 1 puts each actor on a GPU", address, there)  # fmt: skip
        return
    if there < asked:
        fits = int(there // gpus_per_worker)
        advice = f"lower --num-workers to {fits}" if fits else "use --gpus-per-worker 0 to score on CPUs"
        raise ConfigError(
            f"--gpus-per-worker {gpus_per_worker:g} x --num-workers {num_workers} asks {asked:g} GPU(s), but the "
            f"Ray cluster at {address} has {there:g}: its actors could never start; {advice}, or add GPU nodes "
            "(an autoscaling cluster: start them first)"
        )
    if gpus_per_worker > max(nodes):  # nodes with GPUs: the check above passed
        raise ConfigError(
            f"--gpus-per-worker {gpus_per_worker:g}: no node of the Ray cluster at {address} has that many GPUs (the "
            f"largest has {max(nodes):g}), and one actor runs on one node: lower --gpus-per-worker"
        )


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


HUB_SETTINGS = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
"""The driver's Hugging Face settings every node needs to load the same models the same way."""


def hub_runtime_env(runtime_env: dict | None = None) -> dict:
    """RUNTIME_ENV (Ray's, for the job) with the driver's Hub settings added to its ``env_vars``: the token that
    gated and private models need on every node (``HF_TOKEN``, or the one ``hf auth login`` stored here, which the
    other nodes do not have), the endpoint and the offline switches. What RUNTIME_ENV sets already wins. Ray gives
    them to this job's workers; nothing here logs them (Ray's dashboard shows a job's runtime env to whoever can
    open it, as for any Ray job given a token)."""
    from huggingface_hub import get_token

    runtime_env = dict(runtime_env or {})
    given = dict(runtime_env.get("env_vars") or {})
    found = {name: os.environ[name] for name in HUB_SETTINGS if os.environ.get(name)}
    token = get_token()  # HF_TOKEN, else the stored login
    if token:
        found["HF_TOKEN"] = token
    runtime_env["env_vars"] = {**found, **given}
    return runtime_env


def init_ray(address: str, **init_kwargs: Any) -> None:
    """``ray.init`` of the cluster at ADDRESS once per process, the driver's Hub settings given to the job's workers
    (:func:`hub_runtime_env`, over INIT_KWARGS' own ``runtime_env``)."""
    import ray

    if not ray.is_initialized():
        runtime_env = hub_runtime_env(init_kwargs.pop("runtime_env", None))
        ray.init(address=address, runtime_env=runtime_env, **init_kwargs)


def connect(address: str) -> None:
    """Connects this driver to the cluster for Ray Data scoring (the actors' logs stay on the nodes)."""
    init_ray(address, logging_level=logging.WARNING, log_to_driver=False)
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # the driver's own progress line reports the stage
    context.print_on_execution_start = False


def check_visible(folder: Path, timeout: float = 120.0) -> None:
    """Every alive node of the connected cluster reads a file the driver writes in ``folder`` (where the rows to
    score are staged for Ray Data's read tasks): a ConfigError in one line naming the folder and the nodes that
    cannot, before any model loads."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    marker = Path(folder).resolve() / f".ray-visible-{token}"  # the nodes run elsewhere than the driver's folder
    marker.write_text(token)

    def sees(path: str, expected: str) -> bool:
        try:
            with open(path) as handle:
                return handle.read() == expected
        except OSError:
            return False

    task = ray.remote(num_cpus=0, max_retries=0)(sees)
    try:
        nodes = {node["NodeManagerAddress"]: node["NodeID"] for node in ray.nodes() if node["Alive"]}
        asked = {address: task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
                 .remote(str(marker), token) for address, node in nodes.items()}  # fmt: skip
        seen = ray.get(list(asked.values()), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        raise ConfigError(
            f"--output {folder}: the Ray nodes did not say within {timeout:.0f} s whether they can read it"
        ) from None
    finally:
        marker.unlink(missing_ok=True)
    blind = sorted(address for address, sees_it in zip(asked, seen) if not sees_it)
    if blind:
        raise ConfigError(
            f"--output {folder} ({marker.parent}): Ray node(s) {', '.join(blind)} cannot read it; the rows to score "
            "are staged there for every node to read: put the output folder on storage every node mounts at the "
            "same path"
        )


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
            texts = rows[["instruction", "response", "context"]]
            if texts["context"].isna().all():  # single-turn rows: scored exactly as the local path scores them
                texts = texts.drop(columns="context")
            scores = score_frame(self.kinds[int(stage)], self.model, self.tokenizer, texts.reset_index(drop=True),
                                 self.settings["max_length"], self.settings["batch_tokens"], show_progress=False)  # fmt: skip
            # one schema for every block: each stage's columns as float64 (exact for its counts and flags)
            parts.append(scores.astype("float64").reindex(columns=self.columns)
                         .assign(_stage=int(stage), _position=rows["_position"].to_numpy(),
                                 _key=rows["_key"].to_numpy()))  # fmt: skip
        return pd.concat(parts, ignore_index=True)


def _union_columns(kinds: list[str]) -> list[str]:
    from magpie_teach.scoring.scorers import OUTPUTS

    return list(dict.fromkeys(column for kind in kinds for column in OUTPUTS[kind]))


def shard_rows(upper: int, num_workers: int, window: int) -> int:
    """Rows per staged shard (one Ray Data block, one actor call): at most ``window``, and small enough that
    ``upper`` rows make at least :data:`BATCHES_PER_WORKER` blocks per actor."""
    return max(1, min(window, math.ceil(upper / (num_workers * BATCHES_PER_WORKER))))


class Staging:
    """The rows one model has left to score, written as parquet shards of ``rows`` rows into ``folder`` (inside the
    output folder, which every node reads: Ray Data's read tasks open the shards where they run). A row holds its
    texts (``instruction``, ``response``, earlier turns as JSON ``context``), its stage (``_stage``: the index of
    its kind), its ``_position`` in that stage's rows as added, and its score-cache ``_key``. The driver holds
    at most one shard's rows. Used as a context manager: the folder is removed at the end of the block."""

    def __init__(self, folder: Path, rows: int):
        import shutil

        self.folder, self.rows = Path(folder), rows
        shutil.rmtree(self.folder, ignore_errors=True)  # a killed run's shards: staged again from the cache's view
        self.folder.mkdir(parents=True)
        self.files: list[str] = []
        self.counts: dict[int, int] = {}
        self._buffer: list[Any] = []
        self._buffered = 0

    def add(self, stage: int, frame: pd.DataFrame, keys: np.ndarray) -> None:
        import pyarrow as pa

        from magpie_teach.scoring.cache import key_array

        if not len(frame):
            return
        start = self.counts.get(stage, 0)
        self.counts[stage] = start + len(frame)
        context = frame["context"] if "context" in frame.columns else pd.Series([None] * len(frame))
        table = pa.table({
            "instruction": pa.array(frame["instruction"].astype(str).tolist(), pa.string()),
            "response": pa.array(frame["response"].astype(str).tolist() if "response" in frame.columns
                                 else [None] * len(frame), pa.string()),
            "context": pa.array([_context_text(value) for value in context], pa.string()),
            "_stage": pa.array(np.full(len(frame), stage, dtype=np.int64)),
            "_position": pa.array(np.arange(start, start + len(frame), dtype=np.int64)),
            "_key": key_array(keys),
        })  # fmt: skip
        self._buffer.append(table)
        self._buffered += len(table)
        while self._buffered >= self.rows:
            self._flush(self.rows)

    def close(self) -> list[str]:
        """Writes what is left; returns every shard's path, in the order the rows were added."""
        if self._buffered:
            self._flush(self._buffered)
        return self.files

    def _flush(self, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.concat_tables(self._buffer)
        path = self.folder / f"shard-{len(self.files):06d}.parquet"
        pq.write_table(table.slice(0, n), path)
        self.files.append(str(path))
        rest = table.slice(n)
        self._buffer, self._buffered = ([rest] if len(rest) else []), len(rest)

    def __enter__(self) -> "Staging":
        return self

    def __exit__(self, *exc: Any) -> None:
        """The shards go when the block ends, whatever happened: the scores are in the cache by then."""
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)


def _context_text(value: Any) -> str | None:
    """Earlier turns as JSON text (what :func:`magpie_teach.chat.parse_context` reads back), or None."""
    import json

    from magpie_teach.chat import parse_context

    turns = parse_context(value)
    return None if turns is None else json.dumps(turns)


def score_on_ray(
    model: str,
    kinds: list[str],
    staging: Staging,
    *,
    num_workers: int,
    gpus_per_worker: float,
    max_length: int,
    batch_tokens: int,
    dtype: str,
    on_block: Any,
) -> None:
    """Scores the rows ``staging`` holds (its ``_stage`` indexes ``kinds``; its last shard is written here) under
    one ``model`` on the connected cluster: Ray Data reads the shards (a block each) and sends them through one
    actor pool; ``on_block(stage, positions, keys, scores)`` gets each block's scores of each stage as they
    arrive."""
    import ray.data

    from magpie_teach.scoring.cache import KEY_BYTES
    from magpie_teach.scoring.scorers import OUTPUTS

    if len({kind == "reward" for kind in kinds}) > 1:
        raise ValueError(f"one model scores either rewards or losses, not both: {kinds}")
    files = staging.close()
    if not files:
        return
    settings = {"max_length": max_length, "batch_tokens": batch_tokens, "dtype": dtype,
                "device": "cuda" if gpus_per_worker > 0 else "cpu", "threads": 0 if gpus_per_worker > 0 else 1}  # fmt: skip
    resources = {"num_gpus": gpus_per_worker} if gpus_per_worker > 0 else {"num_cpus": 1}
    # a block per shard, read by tasks that take no CPU of their own: where the actors hold every CPU (CPU
    # scoring), the reads still run (`read_parquet`'s file listing asks for a CPU, and would wait for ever)
    listing = ray.data.from_items([{"path": path} for path in files], override_num_blocks=len(files))
    read = listing.map_batches(_read_shards, batch_size=1, batch_format="pyarrow", num_cpus=0)
    scored = read.map_batches(
        _Scorer,
        fn_constructor_args=(model, kinds, settings),
        batch_size=staging.rows,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        **resources,
    )
    for block in scored.iter_batches(batch_size=None, batch_format="pandas"):
        for stage, part in block.groupby("_stage", sort=True):
            kind = kinds[int(stage)]
            keys = np.array(part["_key"].tolist(), dtype=f"S{KEY_BYTES}")
            scores = part[list(OUTPUTS[kind])].astype(OUTPUTS[kind]).reset_index(drop=True)
            on_block(int(stage), part["_position"].to_numpy(), keys, scores)


def _read_shards(batch: Any) -> Any:
    """The rows of the staged shards a batch of paths names, as one Arrow table (a Ray Data read task)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(path) for path in batch["path"].to_pylist()])
