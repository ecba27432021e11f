"""`magpie-teach generate CONFIG [--dry-run]`: responses from several teachers, resumable.

The output is the long format the scoring engine reads (``responses.parquet``: ``id``,
``instruction``, ``teacher``, ``response``, ``generation_index``, ``n_tokens``, ``hit_max_new_tokens``
(the response stopped at the teacher's ``max_new_tokens``: likely cut off),
``status``, ``reason``, ``settings``) plus ``summary.json`` with counts per teacher. Instructions come
from a file or a Hub data set (an ``instruction`` column, or ShareGPT-style ``conversations``),
with exact repeats removed and an optional seeded sample, both counted.
"""

import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from magpie_teach import artefacts
from magpie_teach.errors import DataError, MagpieTeachError
from magpie_teach.generation.config import GenerateConfig
from magpie_teach.steps.pipelines import (
    StoreProgress,
    import_before_fork,
    scratch_cache,
    steps_start_fresh,
    without_distilabel_cache,
)

if TYPE_CHECKING:
    from magpie_teach.batch_store import BatchStore

logger = logging.getLogger(__name__)


@dataclass
class GeneratePlan:
    instructions: pd.DataFrame
    counts: dict
    remaining: dict[str, int]
    todo: dict[str, pd.DataFrame] = field(default_factory=dict)  # per teacher: instructions not yet stored
    routing: pd.DataFrame | None = None  # with a routing: block, the teacher of each instruction (id, teacher, how)
    routing_about: dict = field(default_factory=dict)  # where the routing came from, for the summary and the card


def response_store(config: GenerateConfig) -> "BatchStore":
    """The run's batch store under OUTPUT/store (the resume point)."""
    from magpie_teach.batch_store import BatchStore

    return BatchStore(Path(config.output_dir) / "store")


def magpie_llm(spec: Any) -> Any:
    """The distilabel LLM that writes Magpie instructions (SPEC: ``instructions.magpie``), on its device in its dtype
    (``auto``: bfloat16 on a GPU, float32 on the CPU, not distilabel's ``auto``, the checkpoint's own)."""
    from magpie_teach.generation.llms import BatchedTransformersLLM
    from magpie_teach.modeling import dtype_for, resolve_device

    device = resolve_device(spec.device)
    return BatchedTransformersLLM(
        model=spec.model,
        device=device,
        torch_dtype=dtype_for(spec.dtype, device),
        magpie_pre_query_template=spec.pre_query(),
        generation_kwargs={
            "max_new_tokens": spec.max_new_tokens,
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "do_sample": True,
            "repetition_penalty": 1.0,  # distilabel's default is 1.1: only what the config says is applied
        },
    )


def magpie_instructions(config: GenerateConfig) -> pd.DataFrame:
    """Magpie instructions (distilabel ``MagpieGenerator``), generated once and kept in OUTPUT/instructions.parquet.

    Columns: ``instruction``; ``context`` (JSON of the earlier turns, with ``n_turns`` > 1; the last
    user turn is the instruction the teachers answer); ``category`` (with ``categories``); and the model,
    template and settings that produced each row. Rows the model left empty (or, multi-turn, a conversation
    it did not finish) keep a null instruction; `load_instructions` drops and counts them.
    """
    from distilabel.pipeline import Pipeline

    from magpie_teach.artefacts import write_atomic
    from magpie_teach.steps.generation import MagpieInstructions

    path = Path(config.output_dir) / artefacts.INSTRUCTIONS
    if path.exists():
        return pd.read_parquet(path)
    spec = config.instructions.magpie
    llm = magpie_llm(spec)
    multi = spec.n_turns > 1
    with Pipeline(
        name="magpie-teach-instructions", cache_dir=scratch_cache(config.output_dir, "instructions")
    ) as pipeline:
        MagpieInstructions(
            llm=llm, num_rows=spec.num_rows, batch_size=config.batch_size, n_turns=spec.n_turns,
            only_instruction=not multi, end_with_user=multi, include_system_prompt=False,
            system_prompt=spec.system_prompts(), seed=spec.seed,
        )  # fmt: skip
    import_before_fork()
    generated = without_distilabel_cache(pipeline).run(use_cache=False)["default"]["train"].to_pandas()
    frame = pd.DataFrame({"instruction": generated["instruction"]} if not multi else {})
    if multi:  # keep conversations that end on a user turn; the turns before it are the context
        turns = generated["conversation"].map(lambda c: [dict(m) for m in c] if c is not None else [])
        complete = turns.map(lambda c: len(c) == 2 * spec.n_turns - 1 and c[-1]["role"] == "user")
        frame["instruction"] = [c[-1]["content"] if ok else None for c, ok in zip(turns, complete)]
        frame["context"] = [json.dumps(c[:-1]) if ok else None for c, ok in zip(turns, complete)]
    if "system_prompt_key" in generated.columns:
        frame["category"] = generated["system_prompt_key"].to_numpy()
    frame["magpie_model"], frame["magpie_template"] = spec.model, spec.template
    frame["magpie_settings"] = json.dumps(
        {
            "temperature": spec.temperature,
            "top_p": spec.top_p,
            "max_new_tokens": spec.max_new_tokens,
            "n_turns": spec.n_turns,
            "seed": spec.seed,
            "system_prompt": spec.system_prompt,
            "categories": {k: dataclasses.asdict(v) for k, v in spec.categories.items()} or None,
        }  # fmt: skip
    )
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return frame


def load_instructions(config: GenerateConfig) -> tuple[pd.DataFrame, dict]:
    from magpie_teach.data import instruction_id
    from magpie_teach.tables import load_table

    spec = config.instructions
    if spec.magpie is not None:
        frame = magpie_instructions(config)
    else:
        frame = load_table(spec.path, revision=spec.revision, split=spec.split)
    if spec.column in frame.columns:
        texts = frame[spec.column]
    elif "conversations" in frame.columns:  # ShareGPT: the first human turn
        texts = frame["conversations"].map(
            lambda turns: next((t.get("value") for t in turns if t.get("from") in ("human", "user")), None)
        )
    else:
        raise DataError(f"{spec.path}: no {spec.column!r} or 'conversations' column (columns: {list(frame.columns)})")
    # context (earlier turns) only from Magpie: other data sets use that name for other things (e.g. Dolly)
    extra = [c for c in (("context", "category") if spec.magpie is not None else ("category",)) if c in frame.columns]
    table = pd.DataFrame({"instruction": texts.to_numpy(), **{c: frame[c].to_numpy() for c in extra}})
    counts = {"instructions_in": len(table)}
    table = table[table["instruction"].map(lambda t: isinstance(t, str) and bool(t.strip()))]
    counts["dropped_empty"] = counts["instructions_in"] - len(table)
    lengths = table["instruction"].str.len()
    keep = (lengths >= (spec.min_chars or 0)) & (lengths <= (spec.max_chars or lengths.max()))
    counts["dropped_by_length"] = int((~keep).sum())
    table = table[keep]
    if spec.dedup:
        before = len(table)
        table = table.drop_duplicates(["instruction", *(["context"] if "context" in extra else [])])
        counts["dropped_duplicate"] = before - len(table)
    keyed = (
        table["instruction"] if "context" not in extra else table["context"].fillna("") + "\n" + table["instruction"]
    )
    out = pd.DataFrame({"id": [instruction_id(t) for t in keyed], **{c: table[c].to_numpy() for c in table.columns}})
    if spec.sample is not None and spec.sample < len(out):
        out = out.sample(n=spec.sample, random_state=spec.seed).sort_index()
        counts["dropped_by_sample"] = len(table) - len(out)
    counts["instructions_used"] = len(out)
    out = out.reset_index(drop=True)
    out.attrs["revision"] = frame.attrs.get("revision")  # the Hub commit read, if any
    return out, counts


def plan(config: GenerateConfig, dry_run: bool = False) -> GeneratePlan:
    magpie = config.instructions.magpie
    if dry_run and magpie is not None and not (Path(config.output_dir) / artefacts.INSTRUCTIONS).exists():
        counts = {
            "instructions_in": magpie.num_rows,
            "instructions_used": magpie.num_rows,
            "magpie_to_generate": magpie.num_rows,
        }
        return GeneratePlan(
            pd.DataFrame(columns=["id", "instruction"]), counts, {t.name: magpie.num_rows for t in config.teachers}
        )
    instructions, counts = load_instructions(config)
    store = response_store(config)
    routing, about = None, {}
    if config.routing is not None:
        from magpie_teach.scoring.routing import assignments

        routing, about = assignments(config.routing, instructions, [t.name for t in config.teachers],
                                     Path(config.output_dir))  # fmt: skip
    todo = {}
    for teacher in config.teachers:
        mine = instructions
        if routing is not None:  # each teacher writes only the instructions routed to it
            mine = instructions[(routing["teacher"] == teacher.name).to_numpy()]
        todo[teacher.name] = mine[~mine["id"].isin(store.done_ids(teacher.name))]
    return GeneratePlan(instructions, counts, {name: len(rows) for name, rows in todo.items()}, todo, routing, about)


def assigned_rows(rows: pd.DataFrame, work: GeneratePlan) -> pd.DataFrame:
    """The stored rows this run's instructions asked for: every teacher's of each instruction, or with routing only
    the routed teacher's (the store may hold more: a probe's seed rounds, an earlier run's)."""
    rows = rows[rows["id"].isin(work.instructions["id"])]
    if work.routing is None:
        return rows
    pairs = pd.MultiIndex.from_frame(work.routing[["teacher", "id"]])
    return rows[pd.MultiIndex.from_frame(rows[["teacher", "id"]]).isin(pairs)]


def gpu_plan(config: GenerateConfig, teachers: list) -> dict[str, list[str]]:
    """The GPUs of each replica of the TEACHERS that run on a GPU here (auto or cuda, not an explicit cuda:N), for a
    local pipeline (on Ray, Ray places them): :mod:`magpie_teach.generation.placement`."""
    from magpie_teach.generation.placement import GpuDemand, plan_gpus, visible_gpus
    from magpie_teach.modeling import resolve_device

    if config.ray is not None:
        return {}
    demands = [
        GpuDemand(t.name, t.tensor_parallel_size if t.backend == "vllm" else 1, t.replicas, t.backend == "vllm")
        for t in teachers
        if t.backend != "openai" and t.device in ("auto", "cuda") and resolve_device(t.device) == "cuda"
    ]
    return plan_gpus(demands, visible_gpus()) if demands else {}


def where_teacher_runs(teacher: Any, device: str, placed: list[str] | None, gpus: int | None, on_ray: bool) -> str:
    """One line per teacher, said before it loads: its model, backend and dtype, and where it runs on DEVICE (each
    replica's GPUs as planned here; on Ray, the GPUs each replica's actor asks for)."""
    from magpie_teach.modeling import dtype_for

    if teacher.backend == "openai":
        return f"teacher {teacher.name} ({teacher.model}, openai): at {teacher.base_url}"
    if on_ray:
        where = f"on the Ray cluster, {gpus} GPU(s) per replica" if gpus else "on the Ray cluster's CPUs"
    elif placed:
        where = ", ".join(f"replica {i} on GPU(s) {g}" for i, g in enumerate(placed))
    else:
        where = f"on {device}"
    replicas = f", {teacher.replicas} replicas" if teacher.replicas > 1 and not placed else ""
    dtype = dtype_for(teacher.dtype, device)
    return f"teacher {teacher.name} ({teacher.model}, {teacher.backend}, {dtype}): {where}{replicas}"


def build_pipeline(config: GenerateConfig, work: GeneratePlan) -> tuple[object, dict]:
    """One distilabel branch per teacher with work left: load -> TeacherGeneration (distilabel's TextGeneration) ->
    ResponseFormat (stores batches)."""
    import os

    from distilabel.pipeline import Pipeline
    from distilabel.steps import LoadDataFromDicts, StepResources

    from magpie_teach.chat import build_messages
    from magpie_teach.generation.llms import build_teacher_llm
    from magpie_teach.modeling import resolve_device
    from magpie_teach.steps.generation import ResponseFormat, TeacherChat, TeacherGeneration

    store = response_store(config)
    busy = [t for t in config.teachers if not work.todo[t.name].empty]
    threads = max(1, (os.cpu_count() or 1) // max(len(busy), 1))  # teachers run in parallel processes
    placed = gpu_plan(config, busy)
    devices: dict[str, str] = {}
    if config.ray is not None:  # the cluster's GPUs decide, not this driver's (connected by run_pipeline)
        from magpie_teach.generation.placement import devices_on_cluster
        from magpie_teach.scoring.on_ray import cluster_gpus

        devices = devices_on_cluster(busy, cluster_gpus())
    parameters: dict = {}
    with Pipeline(name="magpie-teach-generate", cache_dir=scratch_cache(config.output_dir, "generate")) as pipeline:
        for i, teacher in enumerate(config.teachers):
            todo = work.todo[teacher.name]
            if todo.empty:
                continue
            records = todo.to_dict("records")
            multi_turn = "context" in todo.columns
            if multi_turn:  # the teacher answers the last user turn, with the earlier turns before it
                for record in records:
                    record["messages"] = build_messages(record["instruction"], context=record["context"])
            load = LoadDataFromDicts(name=f"load_{i}", data=records, batch_size=config.batch_size)
            device = devices.get(teacher.name) or resolve_device(teacher.device)
            llm, gpus = build_teacher_llm(teacher, threads, placed.get(teacher.name), device)
            print(where_teacher_runs(teacher, device, placed.get(teacher.name), gpus, config.ray is not None),
                  file=sys.stderr, flush=True)  # fmt: skip
            generate = (TeacherChat if multi_turn else TeacherGeneration)(
                name=f"generate_{i}",
                llm=llm,
                num_generations=teacher.num_generations,
                group_generations=True,  # a row's generations stay together, so their indices are exact
                input_batch_size=config.batch_size,
                resources=StepResources(replicas=teacher.replicas, gpus=gpus),
            )
            fmt = ResponseFormat(
                name=f"format_{i}", teacher=teacher.name, model=teacher.model, settings=teacher.settings(),
                max_new_tokens=teacher.sampling.max_new_tokens, store_dir=str(store.root), input_batch_size=config.batch_size,
            )  # fmt: skip
            load >> generate >> fmt
            sampling = teacher.sampling
            parameters[generate.name] = {
                "llm": {
                    "generation_kwargs": {
                        "max_new_tokens": sampling.max_new_tokens,
                        "temperature": sampling.temperature if sampling.temperature > 0 else 1.0,
                        "top_p": sampling.top_p,
                        "do_sample": sampling.temperature > 0,
                        "repetition_penalty": 1.0,  # distilabel's default is 1.1: only what the config says
                    }
                }
            }
    return pipeline, parameters


def run_pipeline(config: GenerateConfig, work: GeneratePlan) -> str | None:
    """Generates ``work.todo`` into the response store (with progress); returns why the pipeline failed, if it did
    (what finished is stored either way). `generate` and each round of `probe` run their teachers here."""
    if not any(work.remaining.values()):
        return None
    if config.ray is not None:
        from magpie_teach.scoring.on_ray import init_ray

        # with the driver's Hub token for every node; Ray's own connection lines at this run's log level (-v)
        init_ray(config.ray.address, **{"logging_level": logging.getLogger().getEffectiveLevel(),
                                        **config.ray.init_kwargs})  # fmt: skip
    pipeline, parameters = build_pipeline(config, work)
    if config.ray is not None:
        pipeline = pipeline.ray(ray_init_kwargs=config.ray.init_kwargs)  # no address: it uses this connection
    else:
        import_before_fork()
    pipeline = without_distilabel_cache(pipeline)
    totals = {t.name: work.remaining[t.name] * t.num_generations for t in config.teachers if work.remaining[t.name]}
    with StoreProgress(response_store(config), totals), steps_start_fresh():
        try:
            pipeline.run(use_cache=False, parameters=parameters)
        except Exception as err:  # noqa: BLE001 - the caller reports it with what was kept and what is missing
            failure = f"{type(err).__name__}: {err}"
            logger.error("the generation pipeline failed: %s", failure)
            return failure
    return None


def generate(config: GenerateConfig, dry_run: bool = False) -> dict:
    """Runs (or with ``dry_run`` only plans) the generation; returns the summary."""
    from magpie_teach.generation.config import locate_models

    locate_models(config)
    if dry_run:
        work = plan(config, dry_run)
        return {"counts": work.counts, "remaining": work.remaining, "teachers": {}}
    from magpie_teach.artefacts import locked
    from magpie_teach.processes import reap_descendants

    # one run per output folder; a kill -9 of this process must not leave distilabel's workers (each holding a
    # model) running
    with locked(config.output_dir), reap_descendants():
        return _generate(config)


def _generate(config: GenerateConfig) -> dict:
    from magpie_teach.artefacts import write_atomic
    from magpie_teach.config import dump_config

    work = plan(config)
    summary: dict = {"counts": work.counts, "remaining": work.remaining, "teachers": {}}
    out = Path(config.output_dir)
    files = artefacts.RunOutputs(out, "generate")  # its manifest says "not finished" until the end
    summary["instructions_revision"] = work.instructions.attrs.get("revision")
    dump_config(config, out / artefacts.GENERATE_CONFIG)
    files.written.add(artefacts.GENERATE_CONFIG)
    failure = run_pipeline(config, work)
    rows = response_store(config).read()
    rows = assigned_rows(rows[rows["teacher"].isin([t.name for t in config.teachers])], work)
    rows = rows.sort_values(["teacher", "id", "generation_index"]).reset_index(drop=True)
    for teacher in config.teachers:
        mine = rows[rows["teacher"] == teacher.name]
        asked = (
            len(work.instructions) if work.routing is None else int((work.routing["teacher"] == teacher.name).sum())
        )
        summary["teachers"][teacher.name] = {
            "instructions": asked,
            "rows": len(mine),
            "ok": int((mine["status"] == "ok").sum()),
            "failed": int((mine["status"] != "ok").sum()),
            "hit_max_new_tokens": int(mine["hit_max_new_tokens"].sum()),
            "missing": asked * teacher.num_generations - len(mine),
        }
    if work.routing is not None:
        summary["routing"] = work.routing_about
        routing = work.routing
        files.write(artefacts.ROUTING, lambda tmp: routing.to_csv(tmp, index=False))
    missing = {name: t["missing"] for name, t in summary["teachers"].items() if t["missing"]}
    if missing or failure:  # a step failed inside distilabel: what it did not store is missing, never a row of nulls
        write_atomic(out / artefacts.GENERATE_SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
        raise MagpieTeachError(
            f"generation left rows missing {missing}: {failure or 'a pipeline step failed'} (see the log above); "
            f"finished batches are kept in {out / 'store'}, and rerunning the same command generates only what "
            "is missing"
        )
    files.write(artefacts.RESPONSES, lambda tmp: rows.to_parquet(tmp, index=False))
    if config.scoring is not None:
        from magpie_teach.generation.score_stage import score_responses

        summary["scoring"] = {"output": str(out / "rank"), "counts": score_responses(config, rows)}
    files.write(artefacts.GENERATE_SUMMARY, lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    if (out / artefacts.INSTRUCTIONS).exists():  # Magpie's instructions: published with the run that used them
        files.written.add(artefacts.INSTRUCTIONS)
    files.finish()
    return summary
