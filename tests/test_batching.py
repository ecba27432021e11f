import numpy as np

from magpie_teach.scoring.batching import plan_batches, windows


def test_batches_cover_every_index_once_within_budget_and_padding():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.exp(rng.uniform(np.log(20), np.log(1000), size=500))]
    batches = plan_batches(lengths, batch_tokens=4096, max_padding=0.05)
    assert sorted(i for b in batches for i in b) == list(range(500))
    for batch in batches:
        width = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * width <= 4096
        assert 1 - sum(lengths[i] for i in batch) / (len(batch) * width) <= 0.05
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # longest first: OOM shows at once


def test_long_sequences_go_alone_and_batch_size_is_capped():
    assert plan_batches([5000, 10, 10, 10], batch_tokens=100) == [[0], [1, 2, 3]]
    assert plan_batches([10] * 5, batch_tokens=1000, max_batch_size=2) == [[0, 1], [2, 3], [4]]


def test_windows():
    assert list(windows(range(5), 2)) == [[0, 1], [2, 3], [4]]


def _out_of_memory_above(module, rows: int, seen: list):
    """A forward pre-hook that fails like a GPU out of memory when a batch holds more than ROWS rows (the fault
    a GPU run meets; this machine has no GPU); SEEN records each batch's row count."""
    import torch

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        seen.append(ids.shape[0])
        if ids.shape[0] > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def test_a_batch_that_runs_out_of_gpu_memory_is_scored_in_halves_with_the_same_numbers(tiny_suite, sample_rows,
                                                                                        caplog):  # fmt: skip
    """Losses and rewards when every batch over two rows fails out of memory: the same as without the fault, each
    failing batch retried in halves (with a warning) rather than failing the run."""
    import pytest

    from magpie_teach.errors import ConfigError
    from magpie_teach.modeling import load_model, load_tokenizer
    from magpie_teach.scoring.compatibility import score_compatibility
    from magpie_teach.scoring.reward import score_reward

    x, y = sample_rows["instruction"].tolist()[:16], sample_rows["response"].tolist()[:16]
    lm, lm_tokenizer = load_model(tiny_suite.base_small, device="cpu"), load_tokenizer(tiny_suite.base_small)
    rm, rm_tokenizer = load_model(tiny_suite.reward, "reward", device="cpu"), load_tokenizer(tiny_suite.reward)
    losses = score_compatibility(lm, lm_tokenizer, x, y, batch_tokens=4096, show_progress=False)
    rewards, _ = score_reward(rm, rm_tokenizer, x, y, batch_tokens=4096, show_progress=False)
    seen: list = []
    hooks = [_out_of_memory_above(lm.base_model, 2, seen), _out_of_memory_above(rm, 2, seen)]
    with caplog.at_level("WARNING"):
        halved = score_compatibility(lm, lm_tokenizer, x, y, batch_tokens=4096, show_progress=False)
        halved_rewards, _ = score_reward(rm, rm_tokenizer, x, y, batch_tokens=4096, show_progress=False)
    assert max(seen) > 2 and "out of GPU memory on a batch of" in caplog.text
    np.testing.assert_allclose(halved["compat_loss"], losses["compat_loss"], rtol=1e-5)
    np.testing.assert_allclose(halved["uncond_loss"], losses["uncond_loss"], rtol=1e-5)
    np.testing.assert_allclose(halved_rewards, rewards, rtol=1e-5, atol=1e-6)
    for hook in hooks:
        hook.remove()
    _out_of_memory_above(rm, 0, [])  # not even one row fits
    with pytest.raises(ConfigError, match=r"reward: one conversation of \d+ tokens does not fit in the GPU's memory"):
        score_reward(rm, rm_tokenizer, x[:1], y[:1], show_progress=False)


def test_a_features_batch_that_runs_out_of_gpu_memory_is_pooled_in_halves_with_the_same_numbers(tiny_suite,
                                                                                                 sample_rows):  # fmt: skip
    """The router's features when every batch over two rows fails out of memory: the same as without the fault."""
    from magpie_teach.modeling import load_model, load_tokenizer
    from magpie_teach.scoring.features import score_instruction_features

    texts = list(dict.fromkeys(sample_rows["instruction"]))[:12]
    lm, tokenizer = load_model(tiny_suite.base_small, device="cpu"), load_tokenizer(tiny_suite.base_small)
    features = score_instruction_features(lm, tokenizer, texts, batch_tokens=4096, show_progress=False)
    seen: list = []
    hook = _out_of_memory_above(lm.base_model, 2, seen)
    halved = score_instruction_features(lm, tokenizer, texts, batch_tokens=4096, show_progress=False)
    hook.remove()
    assert max(seen) > 2 and min(seen) <= 2
    np.testing.assert_allclose(halved.filter(like="f").to_numpy(float), features.filter(like="f").to_numpy(float),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    assert halved["n_tokens"].tolist() == features["n_tokens"].tolist()
