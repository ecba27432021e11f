import numpy as np
import pytest
import torch

from magpie_teach.errors import ConfigError
from magpie_teach.modeling import load_model, load_tokenizer
from magpie_teach.scoring.reward import score_reward


def test_reward_matches_unbatched_forward_and_is_batch_invariant(tiny_suite, sample_rows):
    tokenizer, model = load_tokenizer(tiny_suite.reward), load_model(tiny_suite.reward, "reward", device="cpu")
    x, y = sample_rows["instruction"].tolist()[:30], sample_rows["response"].tolist()[:30]
    batched, truncated = score_reward(model, tokenizer, x, y, batch_tokens=4096, show_progress=False)
    assert not truncated.any()
    order = np.random.default_rng(1).permutation(len(x))
    shuffled, _ = score_reward(
        model, tokenizer, [x[i] for i in order], [y[i] for i in order], batch_tokens=300, show_progress=False
    )
    np.testing.assert_allclose(shuffled[np.argsort(order)], batched, atol=1e-4)
    for i in range(0, 30, 7):  # reference: one conversation at a time, no padding, the model's own template
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": x[i]}, {"role": "assistant", "content": y[i]}], tokenize=False
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected = model(input_ids=ids).logits[0, 0].item()
        assert batched[i] == pytest.approx(expected, abs=1e-4)
    assert np.std(batched) > 0


def test_reward_model_with_several_outputs_is_refused(tiny_suite):
    tokenizer, model = load_tokenizer(tiny_suite.reward), load_model(tiny_suite.reward, "reward", device="cpu")
    model.config.num_labels = 2
    with pytest.raises(ConfigError, match="2 outputs"):
        score_reward(model, tokenizer, ["a"], ["b"], show_progress=False)


def test_truncated_conversations_are_flagged(tiny_suite):
    tokenizer, model = load_tokenizer(tiny_suite.reward), load_model(tiny_suite.reward, "reward", device="cpu")
    _, truncated = score_reward(
        model, tokenizer, ["short", "long"], ["ok", "word " * 200], max_length=50, show_progress=False
    )
    assert truncated.tolist() == [False, True]
