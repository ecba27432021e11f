"""Loading models and tokenizers: the same code for a Hub id, a Hub id at a revision, and a local folder."""

import logging
from typing import Any

from magpie_teach.errors import ConfigError

logger = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16", "auto")


def resolve_device(device: str = "auto") -> str:
    """``auto`` is ``cuda`` when a GPU is visible, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was asked for but no CUDA GPU is visible.")
    return device


def resolve_dtype(dtype: str) -> Any:
    import torch

    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}.")
    return "auto" if dtype == "auto" else getattr(torch, dtype)


def load_tokenizer(name_or_path: str, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    from magpie_teach.chat import prepare_tokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
    except OSError as err:
        raise ConfigError(f"Could not load the tokenizer of {name_or_path!r}: {err}") from err
    return prepare_tokenizer(tokenizer)


def load_model(
    name_or_path: str,
    kind: str = "causal-lm",
    dtype: str = "float32",
    device: str = "auto",
    revision: str | None = None,
) -> Any:
    """Loads an ``AutoModelForCausalLM`` (``kind="causal-lm"``) or ``AutoModelForSequenceClassification``
    (``kind="reward"``) in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = {"causal-lm": AutoModelForCausalLM, "reward": AutoModelForSequenceClassification}[kind]
    device = resolve_device(device)
    try:
        model = cls.from_pretrained(name_or_path, dtype=resolve_dtype(dtype), revision=revision)
    except (OSError, ValueError) as err:
        raise ConfigError(f"Could not load {kind} model {name_or_path!r}: {err}") from err
    logger.info("Loaded %s %s (%.1fM parameters) on %s", kind, name_or_path, model.num_parameters() / 1e6, device)
    return model.to(device).eval()
