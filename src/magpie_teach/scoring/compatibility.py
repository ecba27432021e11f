"""Compatibility loss: how well a base model already predicts a teacher's responses.

For an instruction x and a response y, the compatibility loss under base model B is the mean
per-token negative log-likelihood of the response tokens given the instruction,

    l(x, y) = -(1/|y|) * sum_t log p_B(y_t | x, y_<t),

with the conversation rendered exactly as SFT will render it (:mod:`magpie_teach.chat`); the
instruction tokens are context only. The unconditioned loss L(y) scores the same response tokens
with only BOS as context (for IFD), and L(x) the instruction's tokens likewise (for IC-IFD).

The engine sorts each window of examples by length, packs them into token-budgeted right-padded
batches (at most 5% padding each), runs the model's backbone once per batch and applies the output
layer only at the positions that predict a response token, in chunks, in fp32.

Masking: padding sits only at the right, so under the causal mask no real position can attend to
a padding position, and position ids count from 0 as for the unpadded sequence. Real positions
therefore compute exactly what they would alone; padding positions are never scored. No padding
mask is passed to the model, which keeps its fused causal attention kernel (a padding mask makes
SDPA fall back to a materialised mask on CPU). Results do not depend on batch size or order.
"""

import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from magpie_teach.chat import TokenizedExample, context_token_id, tokenize_conversation, unconditioned
from magpie_teach.scoring.batching import plan_batches, run_halving, windows
from magpie_teach.settings import DEFAULT_BATCH_TOKENS, DEFAULT_MAX_LENGTH

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 2048


class TokenNLLScorer:
    """Sums the negative log-likelihood of the marked tokens of many sequences under a causal LM.

    Args:
        model: a loaded ``AutoModelForCausalLM`` in eval mode.
        pad_token_id: id written into padding positions (never attended to, never scored).
        batch_tokens: padded tokens per forward pass.
        max_batch_size: optional cap on sequences per forward pass.
        logits_chunk: positions whose logits are materialised at once (bounds memory at large vocabularies).
    """

    def __init__(
        self,
        model: Any,
        pad_token_id: int = 0,
        batch_tokens: int = DEFAULT_BATCH_TOKENS,
        max_batch_size: int | None = None,
        logits_chunk: int = 1024,
    ):
        import torch

        self.torch = torch
        self.model = model
        self.device = next(model.parameters()).device
        self.pad_token_id = pad_token_id
        self.batch_tokens = batch_tokens
        self.max_batch_size = max_batch_size
        self.logits_chunk = logits_chunk
        self.padded_tokens = 0
        self.real_tokens = 0
        self._fast = self._fast_path_matches()
        if not self._fast:
            logger.warning(
                "%s: the backbone + output layer path does not reproduce the model's logits; "
                "falling back to full logits (slower).",
                type(model).__name__,
            )

    def _head_logits(self, hidden: Any) -> Any:
        logits = self.model.get_output_embeddings()(hidden).float()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if softcap:
            logits = self.torch.tanh(logits / softcap) * softcap
        return logits

    def _fast_path_matches(self) -> bool:
        """Checks once that backbone + output layer gives the model's own logits (softcapping, scaling...)."""
        torch = self.torch
        if self.model.get_output_embeddings() is None:
            return False
        vocab = self.model.get_output_embeddings().weight.shape[0]
        ids = torch.arange(7, device=self.device).unsqueeze(0) * 13 % vocab
        with torch.inference_mode():
            reference = self.model(input_ids=ids).logits.float()
            hidden = self.model.base_model(input_ids=ids).last_hidden_state
            ours = self._head_logits(hidden).to(reference.device)  # a model split over GPUs: the head's is the last
        tolerance = 1e-3 if reference.dtype == torch.float32 and hidden.dtype == torch.float32 else 5e-2
        return bool(torch.allclose(ours, reference, atol=tolerance, rtol=tolerance))

    def _batch(self, examples: Sequence[TokenizedExample]) -> tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        width = max(len(e.input_ids) for e in examples)
        ids = np.full((len(examples), width), self.pad_token_id, dtype=np.int64)
        labels = np.zeros((len(examples), width), dtype=bool)
        for row, example in enumerate(examples):
            n = len(example.input_ids)
            ids[row, :n] = example.input_ids
            labels[row, :n] = example.loss_mask
        self.padded_tokens += ids.size
        self.real_tokens += sum(len(e.input_ids) for e in examples)
        input_ids = torch.from_numpy(ids).to(self.device)
        target_mask = torch.from_numpy(labels[:, 1:]).to(self.device)  # token t is predicted at position t-1
        targets = input_ids[:, 1:][target_mask]
        rows = torch.arange(len(examples), device=self.device).unsqueeze(1).expand_as(target_mask)[target_mask]
        if self._fast:
            hidden = self.model.base_model(input_ids=input_ids).last_hidden_state  # causal: see the module docstring
            hidden = hidden[:, :-1][target_mask.to(hidden.device)]
            logits_at = self._head_logits
        else:
            hidden = self.model(input_ids=input_ids).logits[:, :-1][target_mask]
            logits_at = lambda h: h.float()  # noqa: E731
        nll = torch.empty(len(targets), dtype=torch.float32, device=self.device)
        for start in range(0, len(targets), self.logits_chunk):
            stop = start + self.logits_chunk
            # a model split over GPUs (device_map) computes the backbone's output and the logits on its last GPU, not
            # on the first, where the ids are: the chunk's targets go to the logits, its losses come back
            logits = logits_at(hidden[start:stop])
            nll[start:stop] = torch.nn.functional.cross_entropy(
                logits, targets[start:stop].to(logits.device), reduction="none"
            ).to(nll.device)
        sums = torch.zeros(len(examples), dtype=torch.float64, device=self.device)
        sums.index_add_(0, rows, nll.double())
        counts = torch.from_numpy(labels[:, 1:].sum(axis=1))
        return sums.cpu().numpy(), counts.numpy()

    def score(self, examples: Sequence[TokenizedExample]) -> tuple[np.ndarray, np.ndarray]:
        """Returns (sum of NLL, number of scored tokens) per example, in the order given."""
        sums = np.zeros(len(examples), dtype=np.float64)
        counts = np.zeros(len(examples), dtype=np.int64)
        lengths = [len(e.input_ids) for e in examples]

        def run(batch: list[int]) -> None:
            sums[batch], counts[batch] = self._batch([examples[i] for i in batch])

        with self.torch.inference_mode():
            for batch in plan_batches(lengths, self.batch_tokens, self.max_batch_size):
                run_halving(batch, run, lambda rows: len(rows) * max(lengths[i] for i in rows), "scoring")
        return sums, counts


def _run_windows(
    items: Iterable[Any],
    n_items: int,
    make_examples: Callable[[list[Any]], dict[str, list[TokenizedExample]]],
    scorer: TokenNLLScorer,
    finish: Callable[[dict[str, np.ndarray]], pd.DataFrame],
    *,
    window: int,
    on_window: Callable[[int, pd.DataFrame], None] | None,
    desc: str,
    show_progress: bool | None,
) -> pd.DataFrame:
    """Tokenizes and scores ``items`` one window at a time; ``finish`` turns a window's raw columns into its
    rows, handed to ``on_window(start, rows)`` as each window ends (the score cache stores them there)."""
    from magpie_teach.progress import Progress

    frames = []
    progress = Progress(n_items, desc, show=show_progress)
    start = 0
    for chunk in windows(items, window):
        columns: dict[str, np.ndarray] = {}
        for name, examples in make_examples(chunk).items():
            sums, counts = scorer.score(examples)
            with np.errstate(invalid="ignore", divide="ignore"):
                columns[f"{name}_loss"] = sums / counts
            columns[f"{name}_n_tokens"] = counts
            columns[f"{name}_n_tokens_full"] = np.array([e.n_response_tokens for e in examples], dtype=np.int64)
            columns[f"{name}_truncated"] = np.array([e.truncated for e in examples], dtype=bool)
        frame = finish(columns)
        if on_window is not None:
            on_window(start, frame)
        frames.append(frame)
        start += len(chunk)
        progress.update(len(chunk))
        progress.set_postfix(tok_per_s=f"{scorer.real_tokens / max(time.monotonic() - progress.started, 1e-9):.0f}")
    progress.close()
    return pd.concat(frames, ignore_index=True) if frames else finish({})


def score_compatibility(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    responses: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    unconditioned_loss: bool = True,
    window: int = DEFAULT_WINDOW,
    on_window: Callable[[int, pd.DataFrame], None] | None = None,
    show_progress: bool | None = None,
    desc: str = "compatibility",
    contexts: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Scores each (instruction, response) pair under a causal LM.

    Args:
        model: the base model (``AutoModelForCausalLM``), eval mode.
        tokenizer: its tokenizer, prepared with :func:`magpie_teach.chat.prepare_tokenizer`.
        instructions, responses: aligned sequences of text.
        max_length: conversations longer than this are cut at the right (counted in ``truncated``).
        batch_tokens: padded tokens per forward pass.
        unconditioned_loss: also compute L(y), the response's loss with only BOS as context.
        window: examples tokenized and sorted at a time (memory stays flat in the data size).
        on_window: called with (index of the window's first pair, its rows) as each window is scored.
        show_progress: ``None`` shows a progress bar only on a terminal.
        contexts: earlier turns per pair (multi-turn rows; see :func:`magpie_teach.chat.parse_context`).

    Returns:
        One row per pair: ``compat_loss`` (l(x, y)), ``n_tokens`` (response tokens scored),
        ``n_tokens_full`` (before truncation), ``truncated``, and with ``unconditioned_loss``
        ``uncond_loss`` (L(y), on the same response tokens).
    """
    if len(instructions) != len(responses):
        raise ValueError(f"{len(instructions)} instructions but {len(responses)} responses.")
    scorer = TokenNLLScorer(model, _pad_id(tokenizer), batch_tokens=batch_tokens)
    start_id = context_token_id(tokenizer)

    def make_examples(chunk: list[tuple[str, str, Any]]) -> dict[str, list[TokenizedExample]]:
        cond = [tokenize_conversation(tokenizer, x, y, max_length, context=c) for x, y, c in chunk]
        named = {"cond": cond}
        if unconditioned_loss:
            named["uncond"] = [unconditioned(e.input_ids[e.loss_mask], start_id, max_length) for e in cond]
        return named

    if contexts is not None and len(contexts) != len(instructions):
        raise ValueError(f"{len(instructions)} instructions but {len(contexts)} contexts.")

    def finish(raw: dict[str, np.ndarray]) -> pd.DataFrame:
        out = pd.DataFrame(
            {
                "compat_loss": raw.get("cond_loss", np.empty(0)),
                "n_tokens": raw.get("cond_n_tokens", np.empty(0, dtype=np.int64)),
                "n_tokens_full": raw.get("cond_n_tokens_full", np.empty(0, dtype=np.int64)),
                "truncated": raw.get("cond_truncated", np.empty(0, dtype=bool)),
            }
        )
        if unconditioned_loss:
            out["uncond_loss"] = raw.get("uncond_loss", np.empty(0))
        return out

    out = _run_windows(
        zip(instructions, responses, contexts if contexts is not None else itertools.repeat(None)),
        len(instructions),
        make_examples,
        scorer,
        finish,
        window=window,
        on_window=on_window,
        desc=desc,
        show_progress=show_progress,
    )
    out.attrs["padding_fraction"] = 1 - scorer.real_tokens / max(scorer.padded_tokens, 1)
    return out


def score_text_loss(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = DEFAULT_MAX_LENGTH,
    batch_tokens: int = DEFAULT_BATCH_TOKENS,
    window: int = DEFAULT_WINDOW,
    on_window: Callable[[int, pd.DataFrame], None] | None = None,
    show_progress: bool | None = None,
    desc: str = "text loss",
) -> pd.DataFrame:
    """Mean NLL of each text's tokens with only BOS as context (L(x) for IC-IFD): ``loss``, ``n_tokens``, ``truncated``."""
    scorer = TokenNLLScorer(model, _pad_id(tokenizer), batch_tokens=batch_tokens)
    start_id = context_token_id(tokenizer)

    def make_examples(chunk: list[str]) -> dict[str, list[TokenizedExample]]:
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in chunk]
        return {"text": [unconditioned(np.asarray(i, dtype=np.int64), start_id, max_length) for i in ids]}

    def finish(raw: dict[str, np.ndarray]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "loss": raw.get("text_loss", np.empty(0)),
                "n_tokens": raw.get("text_n_tokens", np.empty(0, dtype=np.int64)),
                "truncated": raw.get("text_truncated", np.empty(0, dtype=bool)),
            }
        )

    return _run_windows(
        texts,
        len(texts),
        make_examples,
        scorer,
        finish,
        window=window,
        on_window=on_window,
        desc=desc,
        show_progress=show_progress,
    )


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if token_id is not None:
            return int(token_id)
    return 0
