"""One scoring stage's scores of a frame of texts, for the local path and every Ray actor alike."""

from typing import Any

import pandas as pd

OUTPUTS = {
    "compat": {
        "compat_loss": "float64",
        "n_tokens": "int64",
        "n_tokens_full": "int64",
        "truncated": "bool",
        "uncond_loss": "float64",
    },  # fmt: skip
    "instruction-loss": {"loss": "float64", "n_tokens": "int64", "truncated": "bool"},
    "reward": {"reward": "float64", "truncated": "bool"},
    "instruction-features": {**{f"f{i}": "float32" for i in range(64)}, "n_tokens": "int64", "truncated": "bool"},
}
"""The columns and dtypes of each stage's scores, as :func:`score_frame` returns them."""


def load_scorer(kind: str, model: str, dtype: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) for a scoring stage: a reward model for ``reward``, else a causal LM."""
    from magpie_teach.modeling import load_tokenizer

    return load_scorer_model(kind, model, dtype, device), load_tokenizer(model)


def load_scorer_model(kind: str, model: str, dtype: str, device: str) -> Any:
    """The model alone of :func:`load_scorer`, for a caller that holds the tokenizer already."""
    from magpie_teach.modeling import load_model

    return load_model(model, "reward" if kind == "reward" else "causal-lm", dtype, device)


def score_frame(
    kind: str,
    model: Any,
    tokenizer: Any,
    frame: pd.DataFrame,
    max_length: int,
    batch_tokens: int,
    *,
    on_window: Any = None,
    show_progress: bool | None = None,
    desc: str | None = None,
) -> pd.DataFrame:
    """One stage's scores of ``frame``'s rows (``instruction``, and ``response`` and ``context`` where the stage
    reads them), in order: ``compat`` (the compatibility losses), ``instruction-loss`` (L(x)) or ``reward``, with
    the columns and dtypes of :data:`OUTPUTS`. The local path and every Ray actor score through here."""
    if kind not in OUTPUTS:
        raise ValueError(f"unknown scoring stage {kind!r}")
    return _score(kind, model, tokenizer, frame, max_length, batch_tokens, on_window, show_progress, desc).astype(
        OUTPUTS[kind]
    )


def _score(kind: str, model: Any, tokenizer: Any, frame: pd.DataFrame, max_length: int, batch_tokens: int,
           on_window: Any, show_progress: bool | None, desc: str | None) -> pd.DataFrame:  # fmt: skip
    from magpie_teach.scoring.compatibility import score_compatibility, score_text_loss
    from magpie_teach.scoring.reward import score_reward

    instructions = frame["instruction"].tolist()
    run = {"max_length": max_length, "batch_tokens": batch_tokens, "show_progress": show_progress}
    if kind == "instruction-loss":
        return score_text_loss(model, tokenizer, instructions, on_window=on_window, desc=desc or "L(x)", **run)
    contexts = frame["context"].tolist() if "context" in frame.columns else None
    if kind == "compat":
        return score_compatibility(model, tokenizer, instructions, frame["response"].tolist(), contexts=contexts,
                                   on_window=on_window, desc=desc or "compat", **run)  # fmt: skip
    if kind == "instruction-features":
        from magpie_teach.scoring.features import score_instruction_features

        return score_instruction_features(model, tokenizer, instructions, on_window=on_window, desc=desc or "features",
                                          **run)  # fmt: skip
    if kind == "reward":
        rewards, truncated = score_reward(model, tokenizer, instructions, frame["response"].tolist(),
                                          contexts=contexts, on_window=on_window, **run)  # fmt: skip
        return pd.DataFrame({"reward": rewards, "truncated": truncated})
    raise AssertionError(kind)
