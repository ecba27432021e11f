"""Loading models: Gemma-2's attention soft-capping is kept (eager attention), and the scorer's identity says so."""

import pytest
import torch


def _gemma2(folder, cap: float):
    """A tiny Gemma-2 whose query and key weights are large enough for the attention soft-cap to bite."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
                          sliding_window=16, attn_logit_softcapping=cap)  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(30)
            layer.self_attn.k_proj.weight.mul_(30)
    model.save_pretrained(folder)
    return str(folder)


def test_gemma2_is_loaded_with_its_soft_capping_and_a_llama_with_the_default(tmp_path, tiny_suite):
    from transformers import AutoModelForCausalLM

    from magpie_teach.modeling import attention_for, load_model

    wide, tight = _gemma2(tmp_path / "cap50", 50.0), _gemma2(tmp_path / "cap1", 1.0)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        loaded = [load_model(path, "causal-lm", device="cpu")(ids).logits for path in (wide, tight)]
        sdpa = [AutoModelForCausalLM.from_pretrained(p, attn_implementation="sdpa").eval()(ids).logits
                for p in (wide, tight)]  # fmt: skip
    assert torch.equal(sdpa[0], sdpa[1])  # what the default attention scored: the cap made no difference
    assert (loaded[0] - loaded[1]).abs().max() > 1e-3  # kept: the cap changes the logits, as in training
    assert attention_for(wide) == "eager"
    assert attention_for(tiny_suite.base_small) is None  # no soft-capping: transformers' default attention
    llama = load_model(tiny_suite.base_small, "causal-lm", device="cpu")
    assert llama.config._attn_implementation != "eager"


def test_the_attention_is_part_of_the_scorers_identity_only_when_it_is_not_the_default():
    from magpie_teach.scoring.cache import scorer_identity

    plain = scorer_identity("compat", "m", "m@1", None, 128, "float32")
    eager = scorer_identity("compat", "m", "m@1", None, 128, "float32", "eager")
    assert "attention" not in plain and eager == {**plain, "attention": "eager"}


@pytest.mark.parametrize("cap", [None, 0.0])
def test_no_cap_means_the_default_attention(tmp_path, cap):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from magpie_teach.modeling import attention_for

    config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, attn_logit_softcapping=cap)  # fmt: skip
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "m")
    assert attention_for(str(tmp_path / "m")) is None
