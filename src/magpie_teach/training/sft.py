"""`magpie-teach train RECIPE [--key value ...]`: SFT with TRL's ``SFTTrainer`` from a YAML recipe.

A recipe is a flat YAML file of ``DataArguments``, TRL's ``SFTConfig`` and ``ModelConfig`` keys (as
in TRL's and alignment-handbook's recipes); flags override it. An unknown key, a data set without a
``messages`` column, or ``assistant_only_loss`` with a chat template that TRL cannot mask (no
``{% generation %}`` markers, and no training version of it in TRL) each stop before training with an
error naming the problem.

The chat template is decided by :func:`magpie_teach.chat.prepare_tokenizer`, the same function the
compatibility loss uses, so training computes its loss on exactly the tokens that were scored:

* ``assistant_only_loss: true`` (the template has ``{% generation %}``, its own or TRL's training
  version of it): ``messages``, loss on the marked tokens, exactly those the compatibility loss averages
  over;
* ``assistant_only_loss: false``: the conversations become TRL's prompt-completion format, loss on
  the tokens after the generation prompt, exactly those scored for a template without markers;
* ``assistant_only_loss: auto`` (the CPU recipe's): true where the template has markers, else false.
  Either way the loss never covers the instruction.

Runs unchanged under ``accelerate launch`` (DDP, DeepSpeed ZeRO-3 via ``recipes/accelerate_configs``).
A run resumes from the last checkpoint in ``output_dir`` when there is one.
"""

import difflib
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from magpie_teach.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    dataset_name: str = field(
        default="",
        metadata={"help": "SFT data: a local folder (e.g. `magpie-teach select` output) or a Hub data set id."},
    )
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Revision of a Hub data set (branch, tag or commit)."}
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to train on."})
    global_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per optimizer step over all processes: gradient_accumulation_steps is set to it / "
            "(per_device_train_batch_size x processes), so the batch is the recipe's on 1 GPU as on 4 or 8."
        },
    )


@dataclass
class TrainResult:
    """What one `train` call did: ``train_tokens`` and ``steps`` count this run only (a resumed run starts at
    ``resumed_from``'s step and tokens); ``total_tokens`` counts from the first step."""

    output_dir: Path
    train_tokens: int
    train_runtime: float
    metrics: dict = field(default_factory=dict)
    dataset_revision: str | None = None
    steps: int = 0
    total_tokens: int = 0
    resumed_from: str | None = None

    def sentence(self) -> str:
        seconds = max(self.train_runtime, 1e-9)
        text = f"trained {self.steps} step(s) on {self.train_tokens} tokens in {seconds:.1f}s"
        if self.steps:
            text += f" ({self.train_tokens / seconds:.0f} tokens/s)"
        if self.resumed_from:
            text += f"; resumed from {Path(self.resumed_from).name}, {self.total_tokens} tokens in all"
        return text


def _checkpoint_progress(checkpoint: str | None) -> tuple[int, int]:
    """(step, tokens seen) recorded in a checkpoint's trainer_state.json; (0, 0) without one."""
    path = Path(str(checkpoint)) / "trainer_state.json" if checkpoint else None
    if path is None or not path.is_file():
        return 0, 0
    state = json.loads(path.read_text())
    return int(state.get("global_step", 0)), int(state.get("num_input_tokens_seen", 0) or 0)


def _argument_classes() -> tuple[type, ...]:
    from trl import ModelConfig, SFTConfig

    return (DataArguments, SFTConfig, ModelConfig)


def _unknown(keys: list[str], where: str) -> ConfigError:
    known = [f.name for cls in _argument_classes() for f in fields(cls)]
    parts = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1)
        parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return ConfigError(f"{where}: unknown key(s) {', '.join(parts)}")


def resolve_recipe(recipe: str) -> Path:
    """A recipe file: the path as given, else one shipped with the package (``tiny/sft/config_cpu.yaml``,
    also written ``recipes/tiny/sft/config_cpu.yaml``), so recipes work from an installed wheel too."""
    from importlib import resources

    path = Path(recipe)
    if path.is_file():
        return path
    shipped = Path(str(resources.files("magpie_teach") / "recipes"))
    relative = path.parts[1:] if path.parts and path.parts[0] == "recipes" else path.parts
    candidate = shipped.joinpath(*relative)
    if relative and candidate.is_file():
        return candidate
    available = sorted(
        str(p.relative_to(shipped)) for p in shipped.rglob("*.yaml") if "accelerate_configs" not in p.parts
    )
    raise ConfigError(f"{recipe}: no such recipe file; shipped recipes: {', '.join(available)}")


def parse_recipe(recipe: str, overrides: list[str] | None = None) -> tuple[Any, Any, Any]:
    """(DataArguments, SFTConfig, ModelConfig) from a recipe file and ``--key value`` overrides."""
    from trl import TrlParser

    from magpie_teach.config import read_yaml_mapping

    recipe = str(resolve_recipe(recipe))

    values = read_yaml_mapping(recipe)
    overrides = list(overrides or [])
    auto = _take_auto(values, overrides)
    known = {f.name for cls in _argument_classes() for f in fields(cls)}
    unknown = [k for k in values if k not in known]
    if unknown:
        raise _unknown(unknown, recipe)
    parser = TrlParser(_argument_classes())
    parser.allow_abbrev = False  # `--max_step` must be an error, not `--max_steps`
    parser.set_defaults_with_config(**values)
    try:
        *parsed, remaining = parser.parse_args_into_dataclasses(
            args=list(overrides or []), return_remaining_strings=True
        )
    except ValueError as err:  # raised by SFTConfig's own checks (e.g. bf16 on a machine without support)
        raise ConfigError(f"{recipe}: {err}") from err
    if remaining:
        raise _unknown(
            [r.lstrip("-").split("=")[0] for r in remaining if r.startswith("--")] or remaining, "command line"
        )
    data_args, training_args, model_args = parsed
    if auto:
        training_args.assistant_only_loss = None  # decided by build_trainer from the model's chat template
    if not data_args.dataset_name:
        raise ConfigError(f"{recipe}: no dataset_name; set it in the recipe or with --dataset_name")
    if not model_args.model_name_or_path:
        raise ConfigError(f"{recipe}: no model_name_or_path; set it in the recipe or with --model_name_or_path")
    return data_args, training_args, model_args


def _take_auto(values: dict, overrides: list[str]) -> bool:
    """Whether the recipe or the command line sets ``assistant_only_loss: auto`` (taken out of both: TRL's field is
    a bool): the masked conversation where the chat template marks the assistant turn, else the prompt-completion
    format; either way the loss is on the response's tokens alone, the ones the compatibility loss scores, so one
    recipe trains any base model."""
    auto = str(values.get("assistant_only_loss")).lower() == "auto"
    if auto:
        del values["assistant_only_loss"]
    for i, item in enumerate(list(overrides)):
        if item == "--assistant_only_loss=auto" or (
            item == "--assistant_only_loss" and overrides[i + 1 : i + 2] == ["auto"]
        ):
            del overrides[i : i + (1 if "=" in item else 2)]
            return True
        if item.startswith("--assistant_only_loss"):
            return False  # the command line's true or false wins over the recipe's auto
    return auto


def load_sft_dataset(data_args: DataArguments) -> tuple[Any, str | None]:
    """The training split and a revision that pins it: the Hub commit id, or a content hash for a local folder."""
    import datasets

    path = Path(data_args.dataset_name)
    if path.exists():
        if data_args.dataset_revision:  # datasets ignores a revision for local folders: refuse rather than mislead
            raise ConfigError(f"{path}: dataset_revision is for Hub data sets; a local folder has no revisions.")
        files = sorted(p for p in path.rglob("*.parquet") if ".cache" not in p.parts)
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in files)).hexdigest()[:12] if files else None
        dataset = datasets.load_dataset(str(path), split=data_args.dataset_split)
        revision = f"sha1:{digest}" if digest else None
    else:
        from huggingface_hub import HfApi

        revision = HfApi().dataset_info(data_args.dataset_name, revision=data_args.dataset_revision).sha
        dataset = datasets.load_dataset(data_args.dataset_name, revision=revision, split=data_args.dataset_split)
    if "messages" not in dataset.column_names:
        raise DataError(
            f"{data_args.dataset_name}: no 'messages' column (columns: {dataset.column_names}); build one with `magpie-teach select`."
        )
    return dataset, revision


def _to_prompt_completion(dataset: Any) -> Any:
    def split(example: dict) -> dict:
        messages = example["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        return {"prompt": messages[:last], "completion": messages[last : last + 1]}

    return dataset.map(split, remove_columns=dataset.column_names)


def _write_model_card(trainer: Any, output_dir: Path, data_args: DataArguments, revision: str | None) -> None:
    if not trainer.is_world_process_zero():
        return
    trainer.create_model_card(
        model_name=output_dir.name, dataset_name=data_args.dataset_name, tags=["magpie-teach", "sft"]
    )
    card = output_dir / "README.md"
    text = card.read_text() if card.exists() else ""
    text += (
        "\n## Training data (magpie-teach)\n\n"
        f"- data set: `{data_args.dataset_name}`\n- revision: `{revision or 'unknown'}`\n- split: `{data_args.dataset_split}`\n"
    )
    card.write_text(text)


def build_trainer(data_args: DataArguments, training_args: Any, model_args: Any) -> tuple[Any, str | None]:
    """The ``SFTTrainer`` that :func:`train` runs (and the data set revision it reads): the one place where the
    chat template and the loss's token mask are decided for training."""
    from trl import SFTTrainer

    from magpie_teach.chat import has_generation_markers
    from magpie_teach.modeling import load_tokenizer

    dataset, revision = load_sft_dataset(data_args)
    tokenizer = load_tokenizer(model_args.model_name_or_path, model_args.model_revision)
    markers = has_generation_markers(tokenizer.chat_template)
    if training_args.assistant_only_loss is None:  # auto
        training_args.assistant_only_loss = markers
        logger.info("assistant_only_loss auto: %s (%s)", markers, "the chat template marks the assistant turn" if
                    markers else "prompt-completion: the template has no {% generation %} markers")  # fmt: skip
    if training_args.assistant_only_loss and not markers:
        raise ConfigError(
            f"{model_args.model_name_or_path}: assistant_only_loss needs a chat template with {{% generation %}} "
            "markers; this one has none and TRL has no training version of it. Set assistant_only_loss: false (or "
            "auto) to train on the tokens after the generation prompt (what the compatibility loss scores for this "
            "template)."
        )
    if not training_args.assistant_only_loss:
        dataset = _to_prompt_completion(dataset)
    if data_args.global_batch_size:
        training_args.gradient_accumulation_steps = accumulation_steps(
            data_args.global_batch_size, training_args.per_device_train_batch_size, training_args.world_size
        )
    training_args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "dtype": master_weights_dtype(model_args.dtype, _under_deepspeed(training_args)),
        "attn_implementation": model_args.attn_implementation,
        **(training_args.model_init_kwargs or {}),
    }
    trainer = SFTTrainer(
        model=model_args.model_name_or_path, args=training_args, train_dataset=dataset, processing_class=tokenizer
    )
    return trainer, revision


def accumulation_steps(global_batch: int, per_device: int, processes: int) -> int:
    """Gradient accumulation steps that make GLOBAL_BATCH examples per optimizer step; a ConfigError when they
    cannot (the recipe's batch would silently change with the number of GPUs otherwise)."""
    per_step = per_device * processes
    if global_batch % per_step:
        raise ConfigError(f"global_batch_size {global_batch} is not a multiple of per_device_train_batch_size "
                          f"{per_device} x {processes} process(es)")  # fmt: skip
    print(f"train: {global_batch} examples per optimizer step = {per_device} per device x {processes} process(es) x "
          f"{global_batch // per_step} accumulation step(s)", file=sys.stderr)  # fmt: skip
    return global_batch // per_step


def master_weights_dtype(dtype: str | None, deepspeed: bool) -> str | None:
    """The dtype the trained weights are held in. A recipe's ``dtype: bfloat16`` (the paper's) halves the memory of
    the weights, but the optimizer then updates bfloat16 weights, whose 8-bit mantissa rounds most of a small
    learning rate's updates away (in a 10-step experiment 28% of the weights changed, against 67.5% with float32
    weights). DeepSpeed keeps float32 master weights of its own, so there the recipe's dtype stands; elsewhere
    (one GPU, DDP, `validate`) the weights load in float32 and ``bf16: true`` computes in bfloat16 (autocast)."""
    if dtype in ("bfloat16", "float16") and not deepspeed:
        print(f"train: weights held in float32 (the recipe's dtype {dtype} would have the optimizer update "
              f"{dtype} weights, rounding small updates away); bf16/fp16 set the compute precision", file=sys.stderr)  # fmt: skip
        return "float32"
    return dtype


def _under_deepspeed(training_args: Any) -> bool:
    """Whether DeepSpeed runs the optimizer: a ``deepspeed`` config in the recipe, or accelerate's DeepSpeed plugin
    (``accelerate launch --config_file recipes/accelerate_configs/zero3.yaml``)."""
    return bool(getattr(training_args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in (
        "1", "true")  # fmt: skip


def train(data_args: DataArguments, training_args: Any, model_args: Any) -> TrainResult:
    """Runs SFT. Returns where the model was saved and the number of training tokens seen."""
    from transformers.trainer_utils import get_last_checkpoint

    output_dir = Path(training_args.output_dir)
    resume = training_args.resume_from_checkpoint
    if resume is None and output_dir.is_dir():
        resume = get_last_checkpoint(str(output_dir))
        if resume:
            logger.warning("Resuming from %s", resume)
    start_step, start_tokens = _checkpoint_progress(resume)
    trainer, revision = build_trainer(data_args, training_args, model_args)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(output_dir))
    _write_model_card(trainer, output_dir, data_args, revision)
    tokens = int(trainer.state.num_input_tokens_seen or 0)
    trainer.accelerator.wait_for_everyone()  # rank 0 writes the card; no rank may tear the group down before
    if hasattr(trainer, "end"):
        trainer.end()
    return TrainResult(
        output_dir,
        tokens - start_tokens,
        float(result.metrics.get("train_runtime", 0.0)),
        dict(result.metrics),
        revision,
        steps=int(trainer.state.global_step) - start_step,
        total_tokens=tokens,
        resumed_from=str(resume) if resume else None,
    )
