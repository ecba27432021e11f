"""`ResponseFormat`: turns distilabel ``TextGeneration`` output into the long format and stores each batch.

Every batch it receives is written to the :class:`magpie_teach.batch_store.BatchStore` before
it is passed on, which makes it the resume point of a generation run. Rows whose generation is
missing or empty are kept with ``status="failed"`` and a ``reason``; they are never scored as
responses.
"""

from typing import TYPE_CHECKING, Any

from distilabel.steps import Step, StepInput
from distilabel.steps.tasks import ChatGeneration, MagpieGenerator, TextGeneration
from pydantic import Field, PrivateAttr

if TYPE_CHECKING:
    from distilabel.typing import GeneratorStepOutput, StepOutput


class TeacherGeneration(TextGeneration):
    """distilabel's ``TextGeneration``, a teacher answering one instruction per row.

    Subclassed for its docstring only: the parent's names a web page among its references, and distilabel, when
    it builds a run's ``Distiset``, tries to turn every reference into a BibTeX entry by scraping a web service
    (which needs ``bs4`` and the network, and printed ``Untracked error: No module named 'bs4'`` in every run)."""


class TeacherChat(ChatGeneration):
    """distilabel's ``ChatGeneration``, a teacher answering the last user turn of each conversation (see
    :class:`TeacherGeneration` for why it is subclassed)."""


class ResponseFormat(Step):
    teacher: str = Field(description="Teacher name written to each row.")
    model: str = Field(description="The teacher model (its tokenizer counts response tokens).")
    settings: str = Field(description="JSON of the teacher's backend and sampling settings.")
    max_new_tokens: int = Field(
        description="A response of this many tokens is flagged hit_max_new_tokens (stopped by the cap, likely cut off)."
    )
    store_dir: str = Field(description="Folder of the response store.")

    _tokenizer: Any = PrivateAttr(default=None)

    def load(self) -> None:
        super().load()
        from magpie_teach.modeling import load_tokenizer

        self._tokenizer = load_tokenizer(self.model)

    @property
    def inputs(self) -> list[str]:
        return ["id", "instruction", "generation"]

    @property
    def outputs(self) -> list[str]:
        return [
            "teacher",
            "response",
            "generation_index",
            "n_tokens",
            "hit_max_new_tokens",
            "status",
            "reason",
            "settings",
        ]

    def process(self, inputs: StepInput) -> "StepOutput":
        import pandas as pd

        from magpie_teach.batch_store import BatchStore

        rows = []
        for row in inputs:  # TextGeneration runs with group_generations: a row's generations arrive together
            generations = row.get("generation")
            for index, text in enumerate(generations if isinstance(generations, list) else [generations]):
                ok = isinstance(text, str) and bool(text.strip())
                # a backend's error for this generation (OpenAITeacher's), if any
                error = _extra_output(row, "error", index)
                n_tokens = len(self._tokenizer(text, add_special_tokens=False)["input_ids"]) if ok else 0
                # the engine's own word on why it stopped (vLLM, OpenAI-compatible servers): "length" is the cap;
                # without it (transformers) a response of max_new_tokens tokens is taken to have hit it
                finish = _extra_output(row, "finish_reason", index)
                capped = finish == "length" if finish is not None else n_tokens >= self.max_new_tokens
                rows.append(
                    {
                        "id": str(row["id"]), "instruction": row["instruction"], "teacher": self.teacher,
                        "response": text if ok else None, "generation_index": index, "n_tokens": n_tokens,
                        "hit_max_new_tokens": ok and capped, "status": "ok" if ok else "failed",
                        "reason": None if ok else ("empty completion" if isinstance(text, str)
                                                   else error if isinstance(error, str) else "no completion (backend error)"),
                        "settings": self.settings,
                        **{k: row[k] for k in ("context", "category") if k in row},
                    }
                )  # fmt: skip
        BatchStore(self.store_dir).write(self.teacher, pd.DataFrame(rows))
        yield rows


class MagpieInstructions(MagpieGenerator):
    """distilabel's ``MagpieGenerator`` producing exactly ``num_rows`` rows, seeded.

    distilabel 1.5.3's loop (``while generated <= num_rows``, batches of ``batch_size``) never marks a
    last batch when ``num_rows`` is not a multiple of ``batch_size``, so the pipeline waits forever, and
    generates one batch too many when it is. Its system-prompt (category) draw uses Python's global
    ``random``, which is seeded here with ``seed``, and so is torch's sampling.
    """

    seed: int = Field(default=0, description="Seeds the category draw and the sampling.")

    def load(self) -> None:
        import random

        super().load()
        random.seed(self.seed)
        try:
            from transformers import set_seed

            set_seed(self.seed)
        except ImportError:  # an engine without transformers seeds itself
            pass

    def process(self, offset: int = 0) -> "GeneratorStepOutput":
        generated = offset
        while generated < self.num_rows:
            size = min(self.batch_size, self.num_rows - generated)
            conversations = self._generate_with_pre_query_template(inputs=[{} for _ in range(size)])
            generated += size
            yield conversations, generated >= self.num_rows


def _extra_output(row: dict, name: str, index: int) -> Any:
    """Generation INDEX's value of a backend's extra output NAME, which distilabel puts on the row as
    ``llm_<step>_<name>`` (a list, one per generation, the rows being grouped); a value that is not a list stands
    for every generation; None when the backend gives none."""
    values = next((v for k, v in row.items() if k.startswith("llm_") and k.endswith(f"_{name}")), None)
    if not isinstance(values, list):
        return values
    return values[index] if index < len(values) else None
