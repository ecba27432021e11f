"""Loading models: Gemma-2's attention soft-capping is kept (eager attention), and the scorer's identity says so."""

import pytest
import torch


def _gemma2(folder, cap: float):
    from magpie_teach.tiny import build_tiny_gemma2

    return build_tiny_gemma2(folder, cap)


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


def _bos_adding(tiny_suite, folder):
    """The tiny model with a tokenizer that adds a BOS (as Llama-3's and Gemma's do) and a chat template that
    writes one too."""
    import shutil

    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    shutil.copytree(tiny_suite.base_small, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    assert tokenizer.chat_template.startswith("{%- if bos_token %}{{ bos_token }}")  # the template writes one
    tokenizer.save_pretrained(folder)
    return str(folder), AutoTokenizer.from_pretrained(folder)


def test_a_teacher_prompt_starts_with_one_bos_when_template_and_tokenizer_both_write_it(tiny_suite, tmp_path):
    """What the teacher's model is given: the transformers pipeline of a teacher (its generate call captured)
    and the ids the vLLM backend sends, for a template that writes BOS and a tokenizer that adds one."""
    from transformers import AutoModelForCausalLM, pipeline

    from magpie_teach.generation.llms import _BatchedPipeline, bos_twice, prompt_ids

    path, tokenizer = _bos_adding(tiny_suite, tmp_path / "bos")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    bos = tokenizer.bos_token_id
    assert tokenizer(text)["input_ids"][:2] == [bos, bos] and bos_twice(tokenizer, text)  # the bug, unfixed
    ids = prompt_ids(tokenizer, text)
    assert ids[0] == bos and ids[1] != bos and ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    plain = tokenizer(text[len(tokenizer.bos_token) :])["input_ids"]  # the template without its BOS: one added
    assert prompt_ids(tokenizer, text[len(tokenizer.bos_token) :]) == plain and plain[0] == bos

    model = AutoModelForCausalLM.from_pretrained(path)
    seen = []
    generate = model.generate

    def capture(*args, **kwargs):
        seen.append(kwargs["input_ids"][0].tolist())
        return generate(*args, **kwargs)

    model.generate = capture
    tokenizer.padding_side = "left"
    batched = _BatchedPipeline(pipeline("text-generation", model=model, tokenizer=tokenizer))
    batched([text], max_new_tokens=2, do_sample=False, return_full_text=False)
    assert seen and seen[0][:2] != [bos, bos] and seen[0] == ids


def test_choosing_the_device_does_not_initialise_cuda_in_a_process_that_forks_workers():
    """`device: auto` asks torch with its NVML-based check (the env var, which forked steps inherit), so the main
    process has not initialised CUDA when distilabel forks its steps or vLLM its engine."""
    import os
    import subprocess
    import sys

    code = ("import os, torch\nfrom magpie_teach.modeling import resolve_device\nresolve_device('auto')\n"
            "print(os.environ.get('PYTORCH_NVML_BASED_CUDA_CHECK'), torch.cuda.is_initialized())")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "PYTORCH_NVML_BASED_CUDA_CHECK"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["1", "False"], result.stderr


def test_auto_on_a_machine_whose_gpus_torch_cannot_see_warns_and_names_them(tmp_path, monkeypatch, caplog):
    from magpie_teach import modeling

    gpus = tmp_path / "gpus"
    for bus in ("0000:01:00.0", "0000:02:00.0"):
        (gpus / bus).mkdir(parents=True)
    monkeypatch.setattr(modeling, "NVIDIA_GPUS", gpus)
    monkeypatch.setattr(modeling, "cuda_visible", lambda: False)  # this machine's torch is a CPU build anyway
    with caplog.at_level("WARNING", logger="magpie_teach.modeling"):
        assert modeling.resolve_device("auto") == "cpu"
    assert "this machine has 2 NVIDIA GPU(s) but torch" in caplog.text and "running on the CPU" in caplog.text
    caplog.clear()
    monkeypatch.setattr(modeling, "NVIDIA_GPUS", tmp_path / "none")  # a machine without the driver: no word
    with caplog.at_level("WARNING", logger="magpie_teach.modeling"):
        assert modeling.resolve_device("auto") == "cpu"
    assert not caplog.text


def test_weights_go_straight_to_their_device_and_span_gpus_only_when_one_cannot_hold_them():
    from magpie_teach.modeling import device_map_for

    assert device_map_for("cuda") == "sequential"  # fits one GPU: stays on it; larger: the next GPUs in order
    assert device_map_for("cuda:3") == {"": "cuda:3"}
    assert device_map_for("cpu") is None


def test_a_model_partly_left_on_the_cpu_or_disk_is_refused_naming_it():
    from magpie_teach.errors import ConfigError
    from magpie_teach.modeling import check_on_gpus

    check_on_gpus("m", {"model.embed_tokens": 0, "model.layers.0": 1, "lm_head": 1})
    check_on_gpus("m", None)  # loaded without a device map
    with pytest.raises(ConfigError, match=r"'org/big' does not fit .* from the cpu and disk"):
        check_on_gpus("org/big", {"model.embed_tokens": 0, "model.layers.30": "cpu", "lm_head": "disk"})


def test_a_model_loaded_on_the_cpu_is_placed_as_before(tiny_suite):
    from magpie_teach.modeling import load_model

    model = load_model(tiny_suite.base_small, "causal-lm", device="cpu")
    assert model.device.type == "cpu" and not model.training and getattr(model, "hf_device_map", None) is None


def test_a_model_loaded_without_a_dtype_asks_for_bfloat16_on_a_gpu_and_float32_on_the_cpu(tiny_suite, monkeypatch):
    """`validate` loads its reward model without naming a dtype: on a GPU that must not be float32 (an 8B reward
    model in float32 is 32 GB and several times slower). What transformers is asked for is watched; on a GPU the
    load stops there (this machine has none)."""
    import torch

    from magpie_teach import modeling

    asked, real = [], modeling.from_pretrained

    def watched(load, name, what, **kwargs):
        if "dtype" not in kwargs:  # the config, read to choose the attention
            return real(load, name, what, **kwargs)
        asked.append(kwargs["dtype"])
        raise RuntimeError("stop here")

    monkeypatch.setattr(modeling, "from_pretrained", watched)
    for device in ("cpu", "cuda"):
        monkeypatch.setattr(modeling, "cuda_visible", lambda device=device: device == "cuda")
        monkeypatch.setattr(modeling, "gpu_memory", lambda: {0: 10**9})
        with pytest.raises(RuntimeError, match="stop here"):
            modeling.load_model(tiny_suite.reward, "reward", device=device)
    assert asked == [torch.float32, torch.bfloat16]
