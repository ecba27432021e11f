"""distilabel LLM classes as the generation pipelines use them."""

from __future__ import annotations

from typing import Any

from distilabel.models import TransformersLLM
from pydantic import Field


class _BatchedPipeline:
    """A transformers text-generation pipeline called on a whole distilabel batch at once. distilabel 1.5.3
    calls the pipeline without ``batch_size``, which makes transformers generate one prompt at a time."""

    def __init__(self, pipeline: Any):
        self._pipeline = pipeline

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def __call__(self, inputs: list, **kwargs: Any) -> Any:
        return self._pipeline(inputs, batch_size=max(len(inputs), 1), **kwargs)


class BatchedTransformersLLM(TransformersLLM):
    """distilabel's ``TransformersLLM`` generating each batch in one padded ``generate`` call (left padding),
    with an optional cap on torch threads for when several teachers share the machine's cores."""

    threads: int | None = Field(default=None, description="torch threads in this step's process (default: torch's).")  # noqa: UP045

    def load(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        super().load()
        self._pipeline.tokenizer.padding_side = "left"  # decoder-only models pad on the left to generate
        self._pipeline = _BatchedPipeline(self._pipeline)
