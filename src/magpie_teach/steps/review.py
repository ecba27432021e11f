"""`ReviewSampleToArgilla`: end a distilabel pipeline by sending a stratified sample for human review.

distilabel's own ``TextGenerationToArgilla`` pushes every row with a fixed thumbs question; this
global step sees all rows, draws the same stratified sample as ``magpie-teach review push``
(:func:`magpie_teach.review.sampling.sample_for_review`) and logs it with the library's settings
(:func:`magpie_teach.review.argilla_io.push_sample`). The server comes from ``ARGILLA_API_URL`` and
``ARGILLA_API_KEY``. Rows pass through unchanged, with ``review_record_id`` set on the sampled ones.
"""

from typing import TYPE_CHECKING, Optional

from distilabel.mixins.runtime_parameters import RuntimeParameter
from distilabel.steps import GlobalStep, StepInput
from pydantic import Field

from magpie_teach.settings import DEFAULT_BETA

if TYPE_CHECKING:
    from distilabel.typing import StepOutput


class ReviewSampleToArgilla(GlobalStep):
    """Samples rows per teacher across reward / CAR bands, plus flagged rows, and logs them to Argilla.

    Input columns: ``id``, ``instruction``, ``response``, ``teacher``, ``base_model``, ``reward``,
    ``compat_loss`` (optional: ``truncated``, ``status``, ``n_tokens_full``).
    Output columns: ``review_record_id`` (the Argilla record id, or None when not sampled).
    """

    # distilabel recognises optional runtime parameters only as typing.Optional[RuntimeParameter[...]]
    dataset_name: Optional[RuntimeParameter[str]] = Field(default=None, description="Argilla dataset.")  # noqa: UP045
    workspace: Optional[RuntimeParameter[str]] = Field(default=None, description="Argilla workspace.")  # noqa: UP045
    per_teacher: RuntimeParameter[int] = Field(default=5, description="Sampled rows per teacher.")
    strata: list[str] = ["reward", "car"]
    bands: RuntimeParameter[int] = Field(default=3, description="Quantile bands per stratum metric.")
    seed: RuntimeParameter[int] = Field(default=0, description="Seed of the sample.")
    beta: RuntimeParameter[float] = Field(default=DEFAULT_BETA, description="CAR's beta.")

    @property
    def inputs(self) -> list[str]:
        return ["id", "instruction", "response", "teacher", "base_model", "reward", "compat_loss"]

    @property
    def outputs(self) -> list[str]:
        return ["review_record_id"]

    def process(self, inputs: StepInput) -> "StepOutput":
        import pandas as pd

        from magpie_teach.review.argilla_io import push_sample, record_id
        from magpie_teach.review.sampling import sample_for_review

        if not self.dataset_name:
            raise ValueError("ReviewSampleToArgilla needs the runtime parameter dataset_name")
        frame = pd.DataFrame(inputs)
        sample = sample_for_review(frame, self.per_teacher, self.strata, self.bands, self.seed, self.beta)
        summary = push_sample(sample, self.dataset_name, self.workspace)
        sent = set(summary["record_ids"])
        self._logger.info("sent %d rows to Argilla dataset %r", summary["records"], self.dataset_name)
        for row in inputs:
            rid = record_id(str(row["base_model"]), str(row["teacher"]), str(row["id"]))
            row["review_record_id"] = rid if rid in sent else None
        yield inputs
