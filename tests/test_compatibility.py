"""The engine against a plain forward pass with hand-written masking, and its invariances."""

import numpy as np
import pandas as pd
import pytest
import torch

from magpie_teach.modeling import load_model, load_tokenizer
from magpie_teach.scoring.compatibility import TokenNLLScorer, score_compatibility, score_text_loss

PAIRS = [
    ("What is two plus two?", "Four."),
    (
        "Why is the sky blue?",
        "Air scatters blue light more than red light, so the sky looks blue from every direction.",
    ),
    ("Give me a tip for writing clear emails.", "State the request first.\n- Keep it short.\n- End with a next step."),
    ("Translate 'good morning' into French.", "Bonjour."),
    ("Explain recursion.", "A function that calls itself on a smaller problem until a base case stops it. " * 4),
]


def reference_losses(model, tokenizer, instruction, response):
    """Plain full forward pass; response tokens located by character offsets in the rendered text."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": instruction}], tokenize=False, add_generation_prompt=True
    )
    answer = response + "<|im_end|>"  # the marked span of the project template: content + end of turn
    text = prompt + answer + "\n"
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])
    in_answer = [len(prompt) <= start < len(prompt) + len(answer) for start, _ in enc["offset_mapping"]]
    positions = [t for t, inside in enumerate(in_answer) if inside]
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
    cond = -np.mean([logp[t - 1, ids[t]].item() for t in positions])
    # unconditioned: the same response tokens after only the BOS/EOS start token
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    plain = torch.tensor([start] + [int(ids[t]) for t in positions])
    with torch.no_grad():
        logp = torch.log_softmax(model(plain[None]).logits[0].double(), dim=-1)
    uncond = -np.mean([logp[t - 1, plain[t]].item() for t in range(1, len(plain))])
    return cond, uncond, len(positions)


@pytest.mark.parametrize("which", ["base_small", "base_large", "reference"])
def test_matches_plain_forward_pass(tiny_suite, which):
    path = getattr(tiny_suite, which)
    tokenizer, model = load_tokenizer(path), load_model(path, device="cpu")
    assert TokenNLLScorer(model)._fast
    out = score_compatibility(model, tokenizer, [x for x, _ in PAIRS], [y for _, y in PAIRS], show_progress=False)
    for row, (x, y) in zip(out.itertuples(), PAIRS):
        cond, uncond, n = reference_losses(model, tokenizer, x, y)
        assert row.n_tokens == n
        assert row.compat_loss == pytest.approx(cond, abs=1e-5)
        assert row.uncond_loss == pytest.approx(uncond, abs=1e-5)


def test_softcapped_model_matches_plain_forward_pass(tiny_suite, tmp_path):
    """Gemma 2 caps its logits: the engine's output-layer-only path must reproduce that."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    tokenizer = load_tokenizer(tiny_suite.base_small)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        final_logit_softcapping=2.0,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Gemma2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert TokenNLLScorer(model)._fast  # the output-layer-only path, with softcapping, is the one in use
    out = score_compatibility(model, tokenizer, [x for x, _ in PAIRS], [y for _, y in PAIRS], show_progress=False)
    for row, (x, y) in zip(out.itertuples(), PAIRS):
        cond, _, _ = reference_losses(model, tokenizer, x, y)
        assert row.compat_loss == pytest.approx(cond, abs=1e-5)


def test_batch_size_and_order_do_not_change_results(tiny_suite, sample_rows):
    tokenizer, model = load_tokenizer(tiny_suite.base_medium), load_model(tiny_suite.base_medium, device="cpu")
    x, y = sample_rows["instruction"].tolist(), sample_rows["response"].tolist()
    one_by_one = score_compatibility(model, tokenizer, x, y, batch_tokens=1, show_progress=False)
    big = score_compatibility(model, tokenizer, x, y, batch_tokens=1 << 16, show_progress=False)
    order = np.random.default_rng(0).permutation(len(x))
    shuffled = score_compatibility(
        model,
        tokenizer,
        [x[i] for i in order],
        [y[i] for i in order],
        batch_tokens=700,
        window=17,
        show_progress=False,
    )
    unshuffled = shuffled.iloc[np.argsort(order)].reset_index(drop=True)
    for other in (big, unshuffled):
        np.testing.assert_allclose(other["compat_loss"], one_by_one["compat_loss"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(other["uncond_loss"], one_by_one["uncond_loss"], atol=1e-4, rtol=0)
        np.testing.assert_array_equal(other["n_tokens"], one_by_one["n_tokens"])
    assert big.attrs["padding_fraction"] > 0  # real padding happened in the big batches


def test_truncation_counted_and_loss_over_kept_tokens(tiny_suite):
    tokenizer, model = load_tokenizer(tiny_suite.base_small), load_model(tiny_suite.base_small, device="cpu")
    out = score_compatibility(
        model, tokenizer, [x for x, _ in PAIRS], [y for _, y in PAIRS], max_length=40, show_progress=False
    )
    long = out["n_tokens_full"] > 40
    assert long.any()
    assert out.loc[long, "truncated"].all()
    assert (out.loc[long, "n_tokens"] < out.loc[long, "n_tokens_full"]).all()
    # a truncated row's loss is the mean over the response tokens kept within max_length: a plain forward pass
    from magpie_teach.chat import tokenize_conversation

    for i in np.flatnonzero(long.to_numpy()):
        example = tokenize_conversation(tokenizer, PAIRS[i][0], PAIRS[i][1], max_length=40)
        ids = torch.tensor([example.input_ids.tolist()])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        kept = [t for t in range(1, len(example.input_ids)) if example.loss_mask[t]]
        reference = -np.mean([logprobs[t - 1, example.input_ids[t]].item() for t in kept])
        assert out.loc[i, "n_tokens"] == len(kept)
        assert out.loc[i, "compat_loss"] == pytest.approx(reference, abs=1e-5)


def test_fallback_path_gives_the_same_numbers(tiny_suite, sample_rows):
    tokenizer, model = load_tokenizer(tiny_suite.base_small), load_model(tiny_suite.base_small, device="cpu")
    fast = TokenNLLScorer(model, tokenizer.pad_token_id)
    slow = TokenNLLScorer(model, tokenizer.pad_token_id)
    slow._fast = False
    from magpie_teach.chat import tokenize_conversation

    examples = [
        tokenize_conversation(tokenizer, x, y) for x, y in zip(sample_rows.instruction[:10], sample_rows.response[:10])
    ]
    np.testing.assert_allclose(fast.score(examples)[0], slow.score(examples)[0], rtol=1e-5)


def test_text_loss_matches_plain_forward_pass(tiny_suite):
    tokenizer, model = load_tokenizer(tiny_suite.base_small), load_model(tiny_suite.base_small, device="cpu")
    texts = ["Why is the sky blue?", "Name three renewable energy sources."]
    out = score_text_loss(model, tokenizer, texts, show_progress=False)
    for loss, text in zip(out["loss"], texts):
        ids = torch.tensor([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[None]).logits[0].double(), -1)
        expected = -np.mean([logp[t - 1, ids[t]].item() for t in range(1, len(ids))])
        assert loss == pytest.approx(expected, abs=1e-5)


def test_each_finished_window_is_handed_over_with_its_first_index_and_rows(tiny_suite, sample_rows):
    tokenizer, model = load_tokenizer(tiny_suite.base_small), load_model(tiny_suite.base_small, device="cpu")
    x, y = sample_rows["instruction"].tolist(), sample_rows["response"].tolist()
    handed = []
    out = score_compatibility(model, tokenizer, x, y, window=20, show_progress=False,
                              on_window=lambda start, rows: handed.append((start, rows.copy())))  # fmt: skip
    assert [start for start, _ in handed] == list(range(0, len(x), 20))
    assert [len(rows) for _, rows in handed] == [min(20, len(x) - start) for start, _ in handed]
    pd.testing.assert_frame_equal(pd.concat([rows for _, rows in handed], ignore_index=True), out)
