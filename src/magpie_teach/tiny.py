"""Tiny models built offline and deterministically from a seed, for tests, the demo and benchmarks.

Everything is saved with ``save_pretrained`` and loaded back through the exact code that loads
Hub models (:func:`magpie_teach.modeling.load_model`), so the tests exercise the real path.

* a byte-level BPE tokenizer trained on text the package ships, whose chat template is
  :data:`magpie_teach.chat.DEFAULT_CHAT_TEMPLATE` (assistant turn marked with ``{% generation %}``);
* causal LMs (Llama architecture, head dimension 32 so vLLM can serve them) of several sizes;
* a GPT-2-architecture LM without a chat template, standing in for the paper's GPT-2 reference;
* a reward model: ``LlamaForSequenceClassification`` with one output.
"""

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from magpie_teach.chat import DEFAULT_CHAT_TEMPLATE

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# name -> (hidden size, layers, attention heads, MLP size); head dimension is hidden / heads = 32
LLAMA_SIZES = {
    "xs": (64, 2, 2, 128),
    "s": (64, 4, 2, 256),
    "m": (128, 4, 4, 384),
    "l": (192, 6, 6, 512),
}


def shipped_texts() -> list[str]:
    """The text the tiny tokenizer is trained on: the instructions and responses of the shipped sample."""
    from magpie_teach.artefacts import sample_responses_path

    texts = []
    for line in Path(sample_responses_path()).read_text().splitlines():
        row = json.loads(line)
        texts += [row["instruction"], row["response"]]
    return texts


def build_tiny_tokenizer(vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained on :func:`shipped_texts`, with the project's chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(shipped_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def _llama_config(tokenizer: Any, size: str, **extra: Any) -> Any:
    from transformers import LlamaConfig

    hidden, layers, heads, mlp = LLAMA_SIZES[size]
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=mlp,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def build_tiny_causal_lm(tokenizer: Any, size: str = "s", seed: int = 0, max_positions: int = 4096) -> Any:
    """A randomly initialised ``LlamaForCausalLM`` of one of :data:`LLAMA_SIZES`."""
    import torch
    from transformers import LlamaForCausalLM

    config = _llama_config(tokenizer, size, max_position_embeddings=max_positions, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def build_tiny_gemma2(folder: str | os.PathLike, cap: float, seed: int = 0) -> str:
    """A tiny Gemma-2 (64-token vocabulary, no tokenizer) saved in FOLDER, with attention soft-capping at CAP and
    query and key weights large enough for the cap to bite; returns the folder."""
    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          sliding_window=16, attn_logit_softcapping=cap)  # fmt: skip
    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    model.save_pretrained(folder)
    return str(folder)


def build_tiny_gpt2(tokenizer: Any, seed: int = 0) -> Any:
    """A randomly initialised ``GPT2LMHeadModel`` (learned absolute positions, tied output layer)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=4096,
        n_embd=64,
        n_layer=2,
        n_head=2,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def build_tiny_reward_model(tokenizer: Any, seed: int = 0) -> Any:
    """A randomly initialised ``LlamaForSequenceClassification`` with one output (a reward model)."""
    import torch
    from transformers import LlamaForSequenceClassification

    config = _llama_config(tokenizer, "xs", max_position_embeddings=4096, num_labels=1)
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


@dataclass
class TinySuite:
    """Paths of a saved tiny suite; each loads with ``from_pretrained`` like a Hub id."""

    base_small: str
    base_medium: str
    base_large: str
    reference: str
    reward: str


def _save(model: Any, tokenizer: Any, path: Path, chat_template: bool = True) -> None:
    """Saves into a temporary sibling folder, then renames: a killed build never leaves half a model."""
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        model.save_pretrained(tmp)
        saved = tokenizer
        if not chat_template:  # the same vocabulary, without a template (like GPT-2)
            saved = copy.deepcopy(tokenizer)
            saved.chat_template = None
        saved.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def build_tiny_suite(root: str | os.PathLike, seed: int = 0) -> TinySuite:
    """Builds (or reuses, when already built with the same seed) the tiny models under ``root``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    suite = TinySuite(
        base_small=str(root / "tiny-llama-s"),
        base_medium=str(root / "tiny-llama-m"),
        base_large=str(root / "tiny-llama-l"),
        reference=str(root / "tiny-gpt2"),
        reward=str(root / "tiny-reward"),
    )
    stamp = root / "suite.json"
    if stamp.exists() and json.loads(stamp.read_text()) == {"seed": seed, "version": 1}:
        if all(Path(p, "config.json").exists() for p in vars(suite).values()):
            return suite
    tokenizer = build_tiny_tokenizer()
    _save(build_tiny_causal_lm(tokenizer, "s", seed), tokenizer, Path(suite.base_small))
    _save(build_tiny_causal_lm(tokenizer, "m", seed + 1), tokenizer, Path(suite.base_medium))
    _save(build_tiny_causal_lm(tokenizer, "l", seed + 2), tokenizer, Path(suite.base_large))
    _save(build_tiny_gpt2(tokenizer, seed + 3), tokenizer, Path(suite.reference), chat_template=False)
    _save(build_tiny_reward_model(tokenizer, seed + 4), tokenizer, Path(suite.reward))
    stamp.write_text(json.dumps({"seed": seed, "version": 1}))
    return suite
