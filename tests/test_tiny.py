import json

import torch

from magpie_teach.tiny import build_tiny_causal_lm, build_tiny_suite, build_tiny_tokenizer


def test_tokenizer_is_deterministic_and_round_trips():
    a, b = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "Why is the sky blue? Rayleigh scattering, 100 degrees."
    assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text


def test_models_are_deterministic_by_seed():
    tokenizer = build_tiny_tokenizer()
    a, b, c = (build_tiny_causal_lm(tokenizer, "s", seed) for seed in (0, 0, 1))
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.state_dict().values(), c.state_dict().values()))


def test_suite_is_saved_like_hub_models_and_reused(tmp_path):
    from transformers import AutoConfig

    suite = build_tiny_suite(tmp_path, seed=3)
    assert AutoConfig.from_pretrained(suite.base_small).model_type == "llama"
    assert AutoConfig.from_pretrained(suite.reference).model_type == "gpt2"
    assert AutoConfig.from_pretrained(suite.reward).num_labels == 1
    assert AutoConfig.from_pretrained(suite.base_small).head_dim == 32  # vLLM serves head dims 32/64
    stamp = (tmp_path / "tiny-llama-s" / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_suite(tmp_path, seed=3) == suite
    assert (tmp_path / "tiny-llama-s" / "model.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((tmp_path / "suite.json").read_text())["seed"] == 3
