"""`magpie-teach evaluate`: students answer a prompt set, a judge compares each answer with a baseline's.

The paper's evidence is AP, the mean of each student's AlpacaEval 2 length-controlled win rate and Arena-Hard win
rate. This module measures the same two quantities offline, on the user's own students:

1. **Answers.** Every student, and the baseline unless its answers come from a file, answers every prompt with
   its chat template, greedy, through the backends of `generate` (:func:`magpie_teach.generation.llms
   .build_teacher_llm`: transformers, vLLM, or an OpenAI-compatible server). Each model's answers are kept in
   ``OUTPUT/answers/<name>.parquet`` (written atomically) with the weights they came from, so a rerun answers
   only what is missing or what a retrained model would answer differently.
2. **Judgements.** A judge LLM reads :data:`JUDGE_PROMPT` with the student's answer as A and the baseline's as
   B, then again with the two swapped, which cancels a judge's preference for a position. The verdict is the
   next token: from its log-probabilities, P(A) / (P(A) + P(B)), summed over the tokens that read ``A`` (or
   ``B``) once stripped of spaces. The transformers backend has the whole distribution; a server gives its top
   :data:`TOP_LOGPROBS`, and when neither letter is among them (or it returns none) the reply's first
   non-space character is read instead (``A`` -> 1, ``B`` -> 0). A verdict that cannot be read either way is
   *unparseable*: counted per student, reported, and the judgement is left out of every win rate (never read as
   a tie). The student's preference is the mean of P(student better) over the two orders.
   A reward model may judge instead: preference = sigmoid(reward(student) - reward(baseline)) (no order).
3. **Win rates** (:mod:`magpie_teach.scoring.winrates`): raw, length-controlled (AlpacaEval 2's logistic model,
   with lengths in characters) and Bradley-Terry (Arena-Hard style), each with a seeded bootstrap interval.

Judgements are cached by content (:class:`magpie_teach.scoring.cache.ScoreCache`: the instruction, both answers in
the order asked, the judge's weights, its chat template and the judging rule), in the score cache's folder: adding a
student judges only its answers, and a killed run resumes from the last finished window.

Outputs: ``judgements.parquet`` (one row per prompt and student: both orders' verdicts, the preference, both
answers and their lengths), ``win_rates.csv``, ``evaluate_config.yaml`` (what `push` puts on the card), and ``performance.csv`` in the layout ``rank --performance``, ``validate
--performance`` and ``calibrate`` read: teacher, base_model, ``AE2_LC_WR`` (the length-controlled win rate),
``ArenaHard_WR`` (the Bradley-Terry score) and ``ap``, their mean.
"""

import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.errors import ConfigError, DataError
from magpie_teach.settings import ConfidenceSettings, JudgeSettings

logger = logging.getLogger(__name__)

JUDGE_PROMPT = """\
Two assistants answered the same instruction. Decide which answer is better: more helpful, more correct and \
clearer. Neither the order of the answers nor their length should decide.

[Instruction]
{instruction}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Reply with one letter: A if answer A is better, B if answer B is better."""
"""The pairwise prompt, sent as the user's turn of the judge's chat template."""

JUDGE_RULE = "pairwise-v1:" + hashlib.sha256(JUDGE_PROMPT.encode()).hexdigest()[:16]
"""Names the prompt and the verdict rule in the judgement cache: a change to either judges again."""

TOP_LOGPROBS = 20
"""Log-probabilities asked of a server per verdict (the OpenAI API's maximum)."""

RATES = ("win_rate", "lc_win_rate", "bt_score")
"""The win rates of :func:`magpie_teach.scoring.winrates.win_rates`, in its columns' order."""

WINDOW = 32
"""Judgements per cache part: a killed run loses at most this many."""


def _shipped_prompts() -> str:
    from importlib.resources import files

    return str(files("magpie_teach") / "resources" / "eval_prompts.jsonl")


@dataclass
class EvaluateConfig(JudgeSettings, ConfidenceSettings):
    """`evaluate`'s settings; the judge and the baseline are :class:`magpie_teach.settings.JudgeSettings`, the
    intervals' bootstrap :class:`magpie_teach.settings.ConfidenceSettings` (over prompts here)."""

    output_dir: str = field(
        metadata={"help": "Where answers, judgements and win rates are written.", "flag": "--output"}
    )
    students: list[str] = field(
        default_factory=list,
        metadata={"help": "A student: model path or Hub id, or TEACHER=MODEL to name the teacher it learnt from; "
                  "repeat.", "flag": "--student"},
    )  # fmt: skip
    students_from: str | None = field(
        default=None,
        metadata={
            "help": "A `validate` output folder: its students (students.csv) with their teachers and base model."
        },
    )
    base_model: str | None = field(
        default=None, metadata={"help": "The students' base model, for performance.csv (with --student)."}
    )
    prompts: str | None = field(
        default=None,
        metadata={"help": "Prompt set: a local file or folder, or a Hub data set, with an `instruction` column (and "
                  "`id`); default: the 24 prompts the package ships."},
    )  # fmt: skip
    prompts_revision: str | None = field(default=None, metadata={"help": "Revision of a Hub prompt set."})
    backend: str = field(
        default="transformers",
        metadata={"help": "How students and the baseline answer: transformers, vllm, or openai (--base-url).",
                  "choices": ["transformers", "vllm", "openai"]},
    )  # fmt: skip
    base_url: str | None = field(default=None, metadata={"help": "The students' OpenAI-compatible server."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest answer, in tokens (greedy decoding)."})
    judge_batch_size: int = field(default=8, metadata={"help": "Judge prompts per forward pass (transformers)."})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (every local model)."})
    dtype: str = field(
        default="auto", metadata={"help": "dtype of every local model; auto is bfloat16 on a GPU, float32 on the CPU."}
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Judgement cache (default: the score cache, $MAGPIE_TEACH_CACHE).",
                                "flag": "--cache-dir"},
    )  # fmt: skip

    def __post_init__(self) -> None:
        self.check_judge()
        if not self.students and not self.students_from:
            raise ConfigError("give the students: --student MODEL (repeat) or --students-from VALIDATE_DIR")
        if self.backend == "openai" and not self.base_url:
            raise ConfigError("--backend openai needs --base-url")
        if self.max_new_tokens < 1:
            raise ConfigError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        self.check_confidence()


@dataclass
class Student:
    name: str
    """The teacher the student learnt from (its name in performance.csv), or the model's own name."""
    model: str
    base_model: str


def parse_students(config: EvaluateConfig) -> list[Student]:
    """The students of ``--student`` and ``--students-from``, in that order; a name given twice is an error."""
    from magpie_teach.scoring.metrics import short_name

    students = []
    for item in config.students:
        name, sep, model = item.partition("=")
        if not sep:
            name, model = short_name(item.rstrip("/")), item
        students.append(Student(name, model, config.base_model or ""))
    if config.students_from:
        table = Path(config.students_from) / "students.csv"
        if not table.exists():
            raise DataError(
                f"--students-from {config.students_from}: no students.csv (is it a `validate` output folder?)"
            )
        frame = pd.read_csv(table)
        missing = {"teacher", "base_model", "student"} - set(frame.columns)
        if missing:
            raise DataError(f"{table}: missing column(s) {sorted(missing)}")
        students += [Student(str(r.teacher), str(r.student), str(r.base_model)) for r in frame.itertuples()]
    names = [s.name for s in students]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"student name(s) {repeated} given twice; name them TEACHER=MODEL")
    return students


def load_prompts(source: str | None, revision: str | None = None) -> pd.DataFrame:
    """``id`` and ``instruction`` of a prompt set (ids default to the row number); DataError naming the file and
    the row for a missing column, an empty instruction or a repeated id."""
    from magpie_teach.tables import load_table

    source = source or _shipped_prompts()
    frame = load_table(source, revision)
    if "instruction" not in frame.columns:
        raise DataError(f"{source}: no `instruction` column (columns: {', '.join(map(str, frame.columns))})")
    if "id" not in frame.columns:
        frame = frame.assign(id=[str(i) for i in range(len(frame))])
    frame = frame[["id", "instruction"]].astype({"id": str}).reset_index(drop=True)
    empty = [i for i, text in enumerate(frame["instruction"]) if not isinstance(text, str) or not text.strip()]
    if empty:
        raise DataError(f"{source}: row {empty[0]} has an empty or non-text instruction ({len(empty)} such row(s))")
    repeated = frame["id"][frame["id"].duplicated()]
    if len(repeated):
        raise DataError(f"{source}: id {repeated.iloc[0]!r} appears more than once")
    if frame.empty:
        raise DataError(f"{source}: no prompts")
    return frame


def generate_answers(model: str, instructions: list[str], max_new_tokens: int, backend: str = "transformers",
                     base_url: str | None = None, device: str = "auto", dtype: str = "auto") -> list[str]:  # fmt: skip
    """Greedy answers of MODEL, with its chat template, through `generate`'s backend (transformers, vllm or
    openai); a failed request of the openai backend is an error naming the model (no answer is invented)."""
    from magpie_teach.chat import build_messages
    from magpie_teach.generation.config import SamplingConfig, TeacherConfig
    from magpie_teach.generation.llms import build_teacher_llm
    from magpie_teach.progress import Progress

    teacher = TeacherConfig(name=model, model=model, backend=backend, device=device, dtype=dtype, base_url=base_url,
                            sampling=SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens))  # fmt: skip
    llm, _ = build_teacher_llm(teacher)
    llm.load()
    answers: list[str] = []
    try:
        with Progress(len(instructions), f"answers of {model}", unit="prompts") as bar:
            for start in range(0, len(instructions), 16):
                chunk = instructions[start : start + 16]
                outputs = llm.generate(inputs=[build_messages(i) for i in chunk], num_generations=1,
                                       max_new_tokens=max_new_tokens, do_sample=False)  # fmt: skip
                for instruction, output in zip(chunk, outputs):
                    text = output["generations"][0]
                    if text is None:
                        error = (output.get("error") or [None])[0]
                        raise DataError(f"{model} gave no answer to {instruction[:60]!r}: {error}")
                    answers.append(text)
                bar.update(len(chunk))
    finally:
        llm.unload()
    return answers


def _answers(
    name: str, model: str, prompts: pd.DataFrame, config: EvaluateConfig, out: Path, cache_root: Path
) -> list[str]:
    """MODEL's answers to PROMPTS, read from ``OUT/answers/NAME.parquet`` when a run already wrote them for the same
    prompts and the same weights (a local folder's content hash or a Hub commit; a served model by its name)."""
    from magpie_teach.artefacts import slug, write_atomic
    from magpie_teach.scoring.cache import model_identity

    identity = (
        model_identity(model, cache_root) if config.backend != "openai" else None
    ) or f"{model}@{config.base_url}"
    path = out / "answers" / f"{slug(name)}.parquet"
    if path.exists():
        kept = pd.read_parquet(path)
        if kept["id"].astype(str).tolist() == prompts["id"].tolist() and kept["model_id"].eq(identity).all():
            return kept["response"].tolist()
    answers = generate_answers(model, prompts["instruction"].tolist(), config.max_new_tokens, config.backend,
                               config.base_url, config.device, config.dtype)  # fmt: skip
    frame = prompts.assign(model=model, model_id=identity, response=answers)
    write_atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))
    return answers


def read_baseline_answers(source: str, prompts: pd.DataFrame) -> list[str]:
    """The baseline's answer to every prompt from a file with ``response`` and ``id`` (or ``instruction``)."""
    from magpie_teach.tables import load_table

    frame = load_table(source)
    key = "id" if "id" in frame.columns else "instruction"
    if "response" not in frame.columns or key not in frame.columns:
        raise DataError(f"--baseline-answers {source}: needs a `response` column and an `id` or `instruction` one")
    frame = frame.astype({key: str}).drop_duplicates(key).set_index(key)
    missing = [k for k in prompts[key] if k not in frame.index]
    if missing:
        raise DataError(f"--baseline-answers {source}: no answer for {key} {missing[0]!r} ({len(missing)} missing)")
    return frame.loc[prompts[key], "response"].astype(str).tolist()


def verdict_from_logprobs(top: dict[str, float]) -> float | None:
    """P(A) / (P(A) + P(B)) from a token -> log-probability map; None when neither letter is in it."""
    a = sum(np.exp(lp) for token, lp in top.items() if token.strip() == "A")
    b = sum(np.exp(lp) for token, lp in top.items() if token.strip() == "B")
    return float(a / (a + b)) if a + b > 0 else None


def verdict_from_text(text: str | None) -> float | None:
    """1 when the reply's first non-space character is ``A``, 0 when it is ``B``, else None."""
    first = (text or "").strip()[:1]
    return {"A": 1.0, "B": 0.0}.get(first)


def judge_messages(instruction: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": JUDGE_PROMPT.format(instruction=instruction, answer_a=answer_a,
                                                            answer_b=answer_b)}]  # fmt: skip


class TransformersJudge:
    """A judge LLM in this process: one forward pass per batch of prompts, the verdict from the next token's whole
    distribution (right padding, each row read at its own last token: the batch does not change a verdict)."""

    def __init__(self, model: str, device: str, dtype: str, batch_size: int, cache_root: Path):
        from magpie_teach.modeling import dtype_for, load_model, load_tokenizer, resolve_device
        from magpie_teach.scoring.cache import model_identity

        device = resolve_device(device)

        self.name, self.batch_size = model, batch_size
        self.tokenizer = load_tokenizer(model)
        self.tokenizer.padding_side = "right"
        self.model = load_model(model, "causal-lm", dtype=dtype, device=device)
        self.forward_passes = 0
        self.model.register_forward_hook(lambda *_: setattr(self, "forward_passes", self.forward_passes + 1))
        # a verdict reads one position per row: with a 128K vocabulary, fp32 logits at every position of a batch of
        # 8 x 2,048 tokens would take 8.4 GB; models that take logits_to_keep compute those positions' logits only
        self.keeps_positions = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        vocabulary = [self.tokenizer.decode([i]).strip() for i in range(len(self.tokenizer))]
        self.letters = {x: [i for i, t in enumerate(vocabulary) if t == x] for x in "AB"}
        if not self.letters["A"] or not self.letters["B"]:
            raise ConfigError(f"judge {model}: its tokenizer has no token that reads 'A' or 'B'")
        self.identity = {"kind": "judge", "rule": JUDGE_RULE, "backend": "transformers", "model": model,
                         "model_id": model_identity(model, cache_root), "dtype": dtype_for(dtype, device),
                         "chat_template_sha256": hashlib.sha256((self.tokenizer.chat_template or "").encode()).hexdigest()}  # fmt: skip

    def p_first(self, triples: list[tuple[str, str, str]]) -> list[float | None]:
        import torch

        texts = [self.tokenizer.apply_chat_template(judge_messages(*t), tokenize=False, add_generation_prompt=True)
                 for t in triples]  # fmt: skip
        verdicts: list[float | None] = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                   add_special_tokens=False).to(self.model.device)  # fmt: skip
            last = batch["attention_mask"].sum(dim=1) - 1
            with torch.inference_mode():
                if self.keeps_positions:  # logits at the rows' last tokens only, not (batch x length x vocabulary)
                    logits = self.model(**batch, logits_to_keep=last).logits
                    logits = logits[torch.arange(len(last)), torch.arange(len(last))].float()
                else:
                    logits = self.model(**batch).logits[torch.arange(len(last)), last].float()
            logp = torch.log_softmax(logits, dim=-1)
            a = torch.logsumexp(logp[:, self.letters["A"]], dim=-1)
            b = torch.logsumexp(logp[:, self.letters["B"]], dim=-1)
            verdicts += torch.sigmoid(a - b).tolist()
        return verdicts


class OpenAIJudge:
    """A judge LLM behind an OpenAI-compatible server: one chat completion of one token per prompt, asked for its
    top :data:`TOP_LOGPROBS` log-probabilities; the reply's text when the letters are not among them."""

    def __init__(self, model: str, base_url: str, api_key_env: str, concurrency: int = 8):
        from openai import OpenAI

        self.name, self.concurrency = model, concurrency
        self.client = OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "unused", max_retries=3)
        self.forward_passes = 0
        self.identity = {"kind": "judge", "rule": JUDGE_RULE, "backend": "openai", "model": model,
                         "model_id": f"{model}@{base_url}"}  # fmt: skip

    def _one(self, triple: tuple[str, str, str]) -> float | None:
        reply = self.client.chat.completions.create(model=self.name, messages=judge_messages(*triple), max_tokens=1,
                                                    temperature=0.0, logprobs=True, top_logprobs=TOP_LOGPROBS)  # fmt: skip
        self.forward_passes += 1
        choice = reply.choices[0]
        content = choice.logprobs.content if choice.logprobs else None
        if content:
            verdict = verdict_from_logprobs({t.token: t.logprob for t in content[0].top_logprobs})
            if verdict is not None:
                return verdict
        return verdict_from_text(choice.message.content)

    def p_first(self, triples: list[tuple[str, str, str]]) -> list[float | None]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(triples)))) as pool:
            return list(pool.map(self._one, triples))


def _cached_verdicts(judge: Any, triples: list[tuple[str, str, str]], cache: Any, desc: str) -> np.ndarray:
    """P(first answer better) per (instruction, first, second), NaN where unparseable; only the triples the cache
    lacks go to the judge, a window at a time, each window stored as it finishes."""
    from magpie_teach.progress import Progress
    from magpie_teach.scoring.cache import example_keys

    keys = example_keys([t[0] for t in triples], [json.dumps(t[1:]) for t in triples])
    verdicts = np.full(len(triples), np.nan)
    found, values = cache.lookup(keys) if cache is not None else (np.zeros(len(keys), dtype=bool), None)
    if values is not None:
        verdicts[found] = values["p_first"].to_numpy()
    todo = np.flatnonzero(~found)
    with Progress(len(todo), desc, unit="verdicts") as bar:
        for start in range(0, len(todo), WINDOW):
            window = todo[start : start + WINDOW]
            got = np.array(
                [np.nan if v is None else v for v in judge.p_first([triples[i] for i in window])], dtype=float
            )
            verdicts[window] = got
            if cache is not None:
                cache.add(keys[window], pd.DataFrame({"p_first": got}))
            bar.update(len(window))
    return verdicts


def judge_pairs(judge: Any, instructions: list[str], student: list[str], baseline: list[str], cache: Any,
                desc: str) -> pd.DataFrame:  # fmt: skip
    """Both orders of every (student, baseline) pair: ``p_student_first`` (P(A) with the student as A),
    ``p_baseline_first`` (P(A) with the baseline as A), and ``preference``, the mean of P(student better) over
    the two orders; NaN (unparseable) when either order is."""
    triples = [(i, s, b) for i, s, b in zip(instructions, student, baseline)]
    triples += [(i, b, s) for i, s, b in zip(instructions, student, baseline)]
    verdicts = _cached_verdicts(judge, triples, cache, desc)
    first, second = verdicts[: len(instructions)], verdicts[len(instructions) :]
    return pd.DataFrame({"p_student_first": first, "p_baseline_first": second,
                         "preference": (first + (1.0 - second)) / 2})  # fmt: skip


class RewardJudge:
    """A reward model as judge: preference = sigmoid(reward(student) - reward(baseline)); rewards cached by
    (instruction, answer)."""

    def __init__(self, model: str, device: str, dtype: str, cache_root: Path):
        from magpie_teach.modeling import dtype_for, load_model, load_tokenizer, resolve_device
        from magpie_teach.scoring.cache import model_identity

        device = resolve_device(device)

        self.name = model
        self.tokenizer = load_tokenizer(model)
        self.model = load_model(model, "reward", dtype=dtype, device=device)
        self.forward_passes = 0
        self.model.register_forward_hook(lambda *_: setattr(self, "forward_passes", self.forward_passes + 1))
        self.identity = {"kind": "judge-reward", "rule": "sigmoid-reward-difference", "model": model,
                         "model_id": model_identity(model, cache_root), "dtype": dtype_for(dtype, device),
                         "chat_template_sha256": hashlib.sha256((self.tokenizer.chat_template or "").encode()).hexdigest()}  # fmt: skip

    def rewards(self, instructions: list[str], answers: list[str], cache: Any) -> np.ndarray:
        from magpie_teach.scoring.cache import example_keys
        from magpie_teach.scoring.reward import score_reward

        keys = example_keys(instructions, answers)
        values = np.full(len(keys), np.nan)
        found, stored = cache.lookup(keys) if cache is not None else (np.zeros(len(keys), dtype=bool), None)
        if stored is not None:
            values[found] = stored["reward"].to_numpy()
        todo = np.flatnonzero(~found)
        if len(todo):
            scored, _ = score_reward(self.model, self.tokenizer, [instructions[i] for i in todo],
                                     [answers[i] if answers[i].strip() else "(empty)" for i in todo], show_progress=False)  # fmt: skip
            values[todo] = scored
            if cache is not None:
                cache.add(keys[todo], pd.DataFrame({"reward": np.asarray(scored, dtype=float)}))
        return values


def build_judge(settings: JudgeSettings, device: str, dtype: str, batch_size: int, cache_root: Path) -> Any:
    if settings.judge_reward_model:
        return RewardJudge(settings.judge_reward_model, device, dtype, cache_root)
    if settings.judge_backend == "openai":
        return OpenAIJudge(settings.judge, settings.judge_base_url, settings.judge_api_key_env)
    return TransformersJudge(settings.judge, device, dtype, batch_size, cache_root)


def judge_students(judge: Any, prompts: pd.DataFrame, answers: dict[str, list[str]], baseline: list[str],
                   cache_root: Path | None) -> pd.DataFrame:  # fmt: skip
    """One row per (prompt, student): the verdicts, the preference (NaN when unparseable), both answers and their
    lengths in characters (``length_diff``: student minus baseline)."""
    from magpie_teach.scoring.cache import ScoreCache

    cache = (
        ScoreCache(cache_root, judge.identity) if cache_root is not None and judge.identity.get("model_id") else None
    )
    instructions = prompts["instruction"].tolist()
    frames = []
    for name, student in answers.items():
        if isinstance(judge, RewardJudge):
            reward_s, reward_b = (
                judge.rewards(instructions, student, cache),
                judge.rewards(instructions, baseline, cache),
            )
            pairs = pd.DataFrame({"reward_student": reward_s, "reward_baseline": reward_b,
                                  "preference": 1.0 / (1.0 + np.exp(-(reward_s - reward_b)))})  # fmt: skip
        else:
            pairs = judge_pairs(judge, instructions, student, baseline, cache, f"judging {name}")
        student_length = np.array([len(a) for a in student])
        baseline_length = np.array([len(a) for a in baseline])
        frames.append(pd.concat([prompts.reset_index(drop=True).assign(student=name), pairs], axis=1).assign(
            parsed=pairs["preference"].notna().to_numpy(), answer=student, baseline_answer=baseline,
            student_length=student_length, baseline_length=baseline_length,
            length_diff=student_length - baseline_length))  # fmt: skip
    return pd.concat(frames, ignore_index=True)


def summarise(judgements: pd.DataFrame, n_replicates: int, confidence: float, seed: int) -> pd.DataFrame:
    """Per student: the win rates of :func:`magpie_teach.scoring.winrates.win_rates` over its parsed judgements,
    and ``n_unparseable``; a student with no parsed judgement gets NaN rates (and a warning)."""
    from magpie_teach.scoring.winrates import win_rates

    parsed = judgements[judgements["parsed"]]
    rates = win_rates(parsed, n_replicates, confidence, seed) if len(parsed) else pd.DataFrame({"student": []})
    counts = judgements.groupby("student", sort=True)["parsed"].agg(n="size", n_parsed="sum").reset_index()
    counts["n_unparseable"] = counts["n"] - counts["n_parsed"]
    out = counts.drop(columns=["n", "n_parsed"]).merge(rates, on="student", how="left")
    for name in ("n", *RATES, *(f"{r}_{end}" for r in RATES for end in ("low", "high") if n_replicates)):
        if name not in out.columns:  # no student had a readable verdict
            out[name] = np.nan
    out["n"] = out["n"].fillna(0).astype(int)  # parsed judgements per student
    for row in out.itertuples():
        if row.n_unparseable:
            logger.warning("%s: %d of %d verdict(s) unparseable, left out of its win rates", row.student,
                           row.n_unparseable, int(counts.set_index("student").loc[row.student, "n"]))  # fmt: skip
    return out


def performance_table(rates: pd.DataFrame, students: list[Student]) -> pd.DataFrame:
    """The layout `rank --performance` reads: teacher, base_model, AE2_LC_WR, ArenaHard_WR, ap (their mean)."""
    by_name = {s.name: s for s in students}
    table = pd.DataFrame({
        "teacher": rates["student"],
        "base_model": [by_name[n].base_model for n in rates["student"]],
        "AE2_LC_WR": rates["lc_win_rate"],
        "ArenaHard_WR": rates["bt_score"],
        "win_rate": rates["win_rate"],
        "student": [by_name[n].model for n in rates["student"]],
    })  # fmt: skip
    table.insert(4, "ap", table[["AE2_LC_WR", "ArenaHard_WR"]].mean(axis=1, skipna=False))
    return table


@dataclass
class EvaluateResult:
    judgements: pd.DataFrame
    win_rates: pd.DataFrame
    performance: pd.DataFrame
    output_dir: Path
    judge_forward_passes: int
    """Forward passes (or server requests) the judge made in this run: 0 when every verdict came from the cache."""
    baseline: str = "baseline"
    first_position: float = float("nan")
    """The judge's mean preference for the answer shown first (0.5: no position bias; NaN for a reward judge)."""


def evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Students' answers, judged against the baseline's, summarised as win rates (see the module docstring)."""
    from magpie_teach import artefacts
    from magpie_teach.config import dump_config
    from magpie_teach.scoring.cache import default_cache_dir

    students = parse_students(config)
    prompts = load_prompts(config.prompts, config.prompts_revision)
    out = Path(config.output_dir)
    cache_root = artefacts.check_writable(
        Path(config.cache_dir) if config.cache_dir else default_cache_dir(), "--cache-dir"
    )
    with artefacts.locked(out):
        outputs = artefacts.RunOutputs(out, "evaluate")
        answers = {s.name: _answers(s.name, s.model, prompts, config, out, cache_root) for s in students}
        if config.baseline_answers:
            baseline = read_baseline_answers(config.baseline_answers, prompts)
        else:
            baseline = _answers(f"baseline-{config.baseline}", config.baseline, prompts, config, out, cache_root)
        judge = build_judge(config, config.device, config.dtype, config.judge_batch_size, cache_root)
        judgements = judge_students(judge, prompts, answers, baseline, cache_root)
        judgements.insert(judgements.columns.get_loc("student") + 1, "baseline",
                          config.baseline or Path(config.baseline_answers).name)  # fmt: skip
        rates = summarise(judgements, config.bootstrap, config.confidence, config.bootstrap_seed)
        first = float("nan")
        if "p_student_first" in judgements.columns:
            from magpie_teach.scoring.winrates import FIRST_POSITION_TOLERANCE, first_position_preference

            first = first_position_preference(judgements["p_student_first"], judgements["p_baseline_first"])
            if abs(first - 0.5) > FIRST_POSITION_TOLERANCE:
                logger.warning("the judge prefers the answer shown %s %.0f%% of the time, whatever it says: asking "
                               "both orders cancels the bias in the win rates but leaves them little signal; a "
                               "stronger judge would tell the answers apart better", "first" if first > 0.5 else
                               "second", 100 * max(first, 1 - first))  # fmt: skip
        performance = performance_table(rates, students)
        outputs.write(artefacts.JUDGEMENTS, lambda tmp: judgements.to_parquet(tmp, index=False))
        outputs.write(artefacts.WIN_RATES, lambda tmp: rates.to_csv(tmp, index=False))
        outputs.write(artefacts.PERFORMANCE, lambda tmp: performance.to_csv(tmp, index=False))
        outputs.write(artefacts.EVALUATE_CONFIG, lambda tmp: dump_config(config, tmp))
        outputs.finish()
    baseline_name = str(judgements["baseline"].iloc[0]) if len(judgements) else "baseline"
    return EvaluateResult(judgements, rates, performance, out, judge.forward_passes, baseline_name, first)
