"""distilabel steps over the scoring engine: the same numbers as `magpie-teach rank`, inside a pipeline.

* :class:`RewardScore` - reward per row (``magpie_teach.scoring.reward.score_reward``; unlike
  distilabel's ``RewardModelScore`` it passes attention masks, right-pads and is batch invariant);
* :class:`CompatibilityScore` - the base model's compatibility loss per row, with L(y), token counts
  and the truncation flag (``magpie_teach.scoring.compatibility.score_compatibility``);
* :class:`CARScore` - a global step: per (teacher, base model) metrics from
  ``magpie_teach.scoring.metrics.aggregate`` (CAR and its rank), written onto each row;
* :class:`StoreScores` - writes each batch's scores to a :class:`~magpie_teach.batch_store.BatchStore`
  (the resume point of ``generate``'s scoring stage).

distilabel replaces the outputs of a normal step that raises with ``None`` and carries on; run
pipelines with :func:`run_checked`, which fails loudly when any scoring column holds a null.
"""

from typing import TYPE_CHECKING, Any

from distilabel.mixins.runtime_parameters import RuntimeParameter
from distilabel.steps import GlobalStep, Step, StepInput
from pydantic import Field, PrivateAttr

from magpie_teach.batch_store import BATCH_KEY, BatchStore
from magpie_teach.errors import MagpieTeachError
from magpie_teach.settings import DEFAULT_BATCH_TOKENS, DEFAULT_BETA, DEFAULT_MAX_LENGTH, DEFAULT_REWARD_SHIFT

if TYPE_CHECKING:
    from distilabel.typing import StepOutput

SCORE_COLUMNS = ("reward", "compat_loss", "uncond_loss", "car")


def _fork_safe_threads() -> None:
    """distilabel forks its step processes. torch's OpenMP pool does not survive a fork once the parent has
    used it (the child hangs at its first parallel op), so a forked worker that inherited torch runs torch
    single-threaded unless ``MAGPIE_TEACH_STEP_THREADS`` says otherwise."""
    import multiprocessing
    import os
    import sys

    if "torch" in sys.modules and multiprocessing.current_process().name != "MainProcess":
        sys.modules["torch"].set_num_threads(int(os.environ.get("MAGPIE_TEACH_STEP_THREADS", "1")))


class _ModelStep(Step):
    model: str = Field(description="Hub id or local folder of the model.")
    max_length: RuntimeParameter[int] = Field(
        default=DEFAULT_MAX_LENGTH, description="Conversations are cut at this many tokens."
    )
    batch_tokens: RuntimeParameter[int] = Field(
        default=DEFAULT_BATCH_TOKENS, description="Padded tokens per forward pass."
    )
    dtype: RuntimeParameter[str] = Field(
        default="auto", description="float32, bfloat16, float16, or auto (bfloat16 on a GPU, float32 on the CPU)."
    )
    device: RuntimeParameter[str] = Field(default="auto", description="cpu, cuda, cuda:N or auto.")
    response_column: str = Field(default="response", description="Column holding the response text.")

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _kind: str = "causal-lm"

    def load(self) -> None:
        super().load()
        _fork_safe_threads()
        from magpie_teach.modeling import load_model, load_tokenizer

        self._tokenizer = load_tokenizer(self.model)
        self._model = load_model(self.model, self._kind, self.dtype, self.device)

    def unload(self) -> None:
        self._model = self._tokenizer = None
        super().unload()

    @property
    def inputs(self) -> list[str]:
        return ["instruction", self.response_column]

    def _texts(self, inputs: StepInput) -> tuple[list[str], list[str]]:
        for i, row in enumerate(inputs):
            for column in ("instruction", self.response_column):
                if not isinstance(row.get(column), str) or not row[column].strip():
                    raise ValueError(f"{self.name}: row {i} of the batch has no {column!r} text ({row.get(column)!r})")
        return [r["instruction"] for r in inputs], [r[self.response_column] for r in inputs]

    @staticmethod
    def _contexts(inputs: StepInput) -> list | None:
        """Earlier turns of multi-turn rows (a ``context`` column), else None."""
        return [r.get("context") for r in inputs] if any(r.get("context") for r in inputs) else None


class RewardScore(_ModelStep):
    """Reward of each (instruction, response) under a 1-output sequence-classification reward model.

    Output columns: ``reward``, ``reward_truncated``.
    """

    _kind: str = "reward"

    @property
    def outputs(self) -> list[str]:
        return ["reward", "reward_truncated"]

    def process(self, inputs: StepInput) -> "StepOutput":
        from magpie_teach.scoring.reward import score_reward

        rewards, truncated = score_reward(
            self._model, self._tokenizer, *self._texts(inputs), contexts=self._contexts(inputs),
            max_length=self.max_length, batch_tokens=self.batch_tokens, show_progress=False,
        )  # fmt: skip
        for row, reward, cut in zip(inputs, rewards, truncated):
            row["reward"], row["reward_truncated"] = float(reward), bool(cut)
        yield inputs


class CompatibilityScore(_ModelStep):
    """The base model's compatibility loss on each response (and L(y), token counts, truncation).

    Output columns: ``base_model``, ``compat_loss``, ``uncond_loss``, ``instr_loss`` (L(x), for IC-IFD),
    ``n_tokens``, ``n_tokens_full``, ``truncated``.
    """

    base_model_name: str | None = Field(default=None, description="Name written to `base_model` (default: model).")

    @property
    def outputs(self) -> list[str]:
        return ["base_model", "compat_loss", "uncond_loss", "instr_loss", "n_tokens", "n_tokens_full", "truncated"]

    def process(self, inputs: StepInput) -> "StepOutput":
        from magpie_teach.scoring.compatibility import score_compatibility, score_text_loss

        instructions, responses = self._texts(inputs)
        scores = score_compatibility(
            self._model, self._tokenizer, instructions, responses, contexts=self._contexts(inputs),
            max_length=self.max_length, batch_tokens=self.batch_tokens, show_progress=False,
        )  # fmt: skip
        unique = list(dict.fromkeys(instructions))
        text = score_text_loss(self._model, self._tokenizer, unique, max_length=self.max_length,
                               batch_tokens=self.batch_tokens, show_progress=False)  # fmt: skip
        instr_loss = dict(zip(unique, text["loss"]))
        for row, score, instruction in zip(inputs, scores.to_dict("records"), instructions):
            row["base_model"] = self.base_model_name or self.model
            row["compat_loss"], row["uncond_loss"] = float(score["compat_loss"]), float(score["uncond_loss"])
            row["instr_loss"] = float(instr_loss[instruction])
            row["n_tokens"], row["n_tokens_full"] = int(score["n_tokens"]), int(score["n_tokens_full"])
            row["truncated"] = bool(score["truncated"])
        yield inputs


class CARScore(GlobalStep):
    """Per (teacher, base model): mean reward, mean compatibility loss and CAR = r / (1 + beta * L), on every row.

    Output columns: ``car``, ``rank_car``, ``teacher_reward``, ``teacher_compat_loss``.
    """

    beta: RuntimeParameter[float] = Field(default=DEFAULT_BETA, description="CAR's beta.")
    reward_shift: RuntimeParameter[str] = Field(default=DEFAULT_REWARD_SHIFT, description="none, auto or a number.")

    @property
    def inputs(self) -> list[str]:
        return ["teacher", "base_model", "reward", "compat_loss", "n_tokens_full", "truncated"]

    @property
    def outputs(self) -> list[str]:
        return ["car", "rank_car", "teacher_reward", "teacher_compat_loss"]

    def process(self, inputs: StepInput) -> "StepOutput":
        import pandas as pd

        from magpie_teach.scoring.metrics import aggregate

        table = aggregate(pd.DataFrame(inputs), beta=self.beta, reward_shift=self.reward_shift)
        by_key = table.set_index(["teacher", "base_model"])
        for row in inputs:
            metrics = by_key.loc[(row["teacher"], row["base_model"])]
            row["car"], row["rank_car"] = float(metrics["car"]), int(metrics["rank_car"])
            row["teacher_reward"], row["teacher_compat_loss"] = float(metrics["reward"]), float(metrics["compat_loss"])
        yield inputs


def run_checked(pipeline: Any, **kwargs: Any) -> Any:
    """``pipeline.run(**kwargs)``, then an error if a leaf step produced nothing or any scoring column holds
    a null (distilabel's trace of a step that raised)."""
    distiset = pipeline.run(**kwargs)
    leaves = list(pipeline.dag.leaf_steps)
    if not len(distiset) or any(sum(len(d) for d in distiset[c].values()) == 0 for c in distiset):
        raise MagpieTeachError(
            f"pipeline {pipeline.name!r} produced no rows for {leaves}; a step failed - see the log above"
        )
    for config in distiset:
        for split, dataset in distiset[config].items():
            for column in (c for c in SCORE_COLUMNS if c in dataset.column_names):
                nulls = [i for i, value in enumerate(dataset[column]) if value is None]
                if nulls:
                    raise MagpieTeachError(
                        f"pipeline {pipeline.name!r}: column {column!r} of {config}/{split} is null in {len(nulls)} "
                        f"row(s) (first: row {nulls[0]}); a scoring step failed - see the log above"
                    )
    return distiset


class StoreScores(Step):
    """Stores each batch's key and score columns in the run's score store (the resume point of scoring).

    A batch with a null score (distilabel's trace of an upstream step that raised) is refused, so a
    failed batch is never taken for a finished one."""

    store_dir: str = Field(description="Folder of the score store.")
    stage: str = Field(description="Sub-folder: `reward` or `compat-N`.")
    columns: list[str] = Field(description="Score columns to store.")

    @property
    def inputs(self) -> list[str]:
        return [*BATCH_KEY, *self.columns]

    @property
    def outputs(self) -> list[str]:
        return []

    def process(self, inputs: StepInput) -> "StepOutput":
        import pandas as pd

        frame = pd.DataFrame(inputs)[[*BATCH_KEY, *self.columns]]
        nulls = frame[self.columns].isna().any(axis=1)
        if nulls.any():
            first = frame.loc[nulls, BATCH_KEY].iloc[0].to_dict()
            raise MagpieTeachError(f"{self.stage}: {int(nulls.sum())} row(s) came without scores (first: {first})")
        BatchStore(self.store_dir).write(self.stage, frame)
        yield inputs
