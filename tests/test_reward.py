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


def test_a_reward_model_whose_pad_is_its_eos_is_read_at_the_last_token_of_a_template_that_ends_with_eos(
    tiny_suite, sample_rows, tmp_path
):
    """Many reward models have no pad token and get pad = EOS; under a template whose conversation ends with EOS the
    model's pooling (the last token that is not pad) would read the token before it. The reference pools by hand:
    the backbone's last hidden state at the conversation's true last token, through the score head."""
    import json
    import shutil

    folder = tmp_path / "reward-pad-eos"
    shutil.copytree(tiny_suite.reward, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "pad_token_id": config["eos_token_id"]}))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": settings["eos_token"]}))
    template = (folder / "chat_template.jinja").read_text()
    (folder / "chat_template.jinja").write_text(template.replace("{{ '\n' }}", ""))  # the turn ends with EOS
    tokenizer, model = load_tokenizer(str(folder)), load_model(str(folder), "reward", device="cpu")
    assert tokenizer.pad_token_id == model.config.pad_token_id == tokenizer.eos_token_id
    x, y = sample_rows["instruction"].tolist()[:12], sample_rows["response"].tolist()[:12]
    rewards, _ = score_reward(model, tokenizer, x, y, batch_tokens=400, show_progress=False)
    for i in range(len(x)):
        text = tokenizer.apply_chat_template([{"role": "user", "content": x[i]}, {"role": "assistant", "content": y[i]}],
                                             tokenize=False)  # fmt: skip
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id
        with torch.no_grad():
            hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            expected = model.score(hidden).item()
        assert rewards[i] == pytest.approx(expected, abs=1e-4), i


def test_a_checkpoint_without_the_reward_head_is_refused_rather_than_given_a_random_one(tiny_suite):
    """A causal LM named as the reward model: transformers would add a randomly initialised score head and go on
    (random rewards, cached as if real). The load names the missing weights and what to do instead."""
    with pytest.raises(ConfigError, match=r"its checkpoint has no weights for score\.weight.*--reward-column"):
        load_model(tiny_suite.base_small, "reward", device="cpu")
    assert load_model(tiny_suite.reward, "reward", device="cpu").config.num_labels == 1
