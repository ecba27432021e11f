"""The router's instruction features (scoring/features.py): the base model's pooled hidden states, projected, against
an independent computation; padding never enters them; cached like every score."""

import numpy as np
import pytest
import torch


def test_features_are_the_projected_mean_of_the_last_hidden_states_over_the_prompt(tiny_suite, sample_rows):
    from transformers import AutoModelForCausalLM

    from magpie_teach.modeling import load_tokenizer
    from magpie_teach.scoring.features import DIMENSIONS, projection, score_instruction_features

    tokenizer = load_tokenizer(tiny_suite.base_small)
    model = AutoModelForCausalLM.from_pretrained(tiny_suite.base_small).eval()
    texts = list(dict.fromkeys(sample_rows["instruction"]))[:6]
    features = score_instruction_features(model, tokenizer, texts, show_progress=False)
    assert list(features.columns[:DIMENSIONS]) == [f"f{i}" for i in range(DIMENSIONS)]
    matrix = projection(model.config.hidden_size)
    for row, text in enumerate(texts):  # one at a time, no padding, by hand
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)  # fmt: skip
        with torch.no_grad():
            hidden = model(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        expected = hidden.mean(dim=0).numpy() @ matrix
        np.testing.assert_allclose(features.iloc[row, :DIMENSIONS].to_numpy(float), expected, rtol=1e-4, atol=1e-5)
        assert features["n_tokens"].iloc[row] == len(ids) and not features["truncated"].iloc[row]
    # a batch of very different lengths (padded together) gives each instruction the same features
    long = texts[0] + " " + " ".join(texts) * 3
    together = score_instruction_features(model, tokenizer, [texts[1], long], show_progress=False)
    np.testing.assert_allclose(together.iloc[0, :DIMENSIONS].to_numpy(float),
                               features.iloc[1, :DIMENSIONS].to_numpy(float), rtol=1e-4, atol=1e-5)  # fmt: skip
    cut = score_instruction_features(model, tokenizer, [long], max_length=8, show_progress=False)
    assert cut["truncated"].iloc[0] and cut["n_tokens"].iloc[0] == 8


def test_the_projection_is_fixed_per_hidden_size():
    from magpie_teach.scoring.features import projection

    assert np.array_equal(projection(32), projection(32)) and projection(32).shape == (32, 64)
    assert not np.allclose(projection(32)[:16], projection(16))
    assert projection(4096).std() == pytest.approx(1 / 8, rel=0.01)


def test_features_go_through_the_score_cache(tiny_suite, sample_rows, tmp_path):
    from magpie_teach.ranking.rank import RankConfig
    from magpie_teach.scoring.executor import ScoringSession, instruction_features

    config = RankConfig(data="x", output_dir=str(tmp_path / "o"), base_models=[tiny_suite.base_small],
                        reward_column="r", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    rows = (
        sample_rows[["id", "instruction"]]
        if "id" in sample_rows
        else sample_rows.assign(id=sample_rows["instruction"])
    )
    work: dict = {}
    with ScoringSession(tmp_path / "o") as session:
        first = instruction_features(config, tiny_suite.base_small, rows, work, session)
    again_work: dict = {}
    with ScoringSession(tmp_path / "o") as session:
        again = instruction_features(config, tiny_suite.base_small, rows, again_work, session)
        assert session.scorer is None  # nothing left to score: the model was never loaded
    n = rows["id"].nunique()
    (stage,) = work.values()
    assert stage == {"scored": n, "from_cache": 0}
    assert list(again_work.values())[0] == {"scored": 0, "from_cache": n}
    assert first.equals(again) and len(first) == n and first["id"].is_unique


def test_features_are_stored_window_by_window_and_equal_one_pass(tiny_suite, sample_rows):
    from transformers import AutoModelForCausalLM

    from magpie_teach.modeling import load_tokenizer
    from magpie_teach.scoring.features import score_instruction_features

    tokenizer = load_tokenizer(tiny_suite.base_small)
    model = AutoModelForCausalLM.from_pretrained(tiny_suite.base_small).eval()
    texts = list(dict.fromkeys(sample_rows["instruction"]))[:5]
    stored = []
    windowed = score_instruction_features(model, tokenizer, texts, window=2, show_progress=False,
                                          on_window=lambda start, rows: stored.append((start, len(rows))))  # fmt: skip
    assert stored == [(0, 2), (2, 2), (4, 1)]
    whole = score_instruction_features(model, tokenizer, texts, show_progress=False)
    np.testing.assert_allclose(windowed.iloc[:, :64].to_numpy(float), whole.iloc[:, :64].to_numpy(float), rtol=1e-4,
                               atol=1e-5)  # fmt: skip


def test_a_released_session_model_is_gone_before_the_gpu_cache_is_emptied(tiny_suite, sample_rows, tmp_path,
                                                                          monkeypatch):  # fmt: skip
    """probe scores each round in its own process, then starts the next round's teachers (vLLM engines, other
    processes): the scoring model's GPU memory must go back to the driver, which emptying torch's cache does only for
    blocks already freed. On the CPU the cache is watched instead of emptied."""
    import weakref

    from magpie_teach.ranking.rank import RankConfig
    from magpie_teach.scoring.executor import ScoringSession, instruction_features

    config = RankConfig(data="x", output_dir=str(tmp_path / "o"), base_models=[tiny_suite.base_small],
                        reward_column="r", cache_dir=str(tmp_path / "cache"))  # fmt: skip
    rows = sample_rows.assign(id=sample_rows["instruction"])[["id", "instruction"]].drop_duplicates("id").head(3)
    session = ScoringSession(tmp_path / "o")
    instruction_features(config, tiny_suite.base_small, rows, None, session)
    model = weakref.ref(session.scorer[1])
    alive_when_emptied = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: alive_when_emptied.append(model() is not None))
    session.release()
    assert alive_when_emptied == [False] and session.scorer is None
    session.release()  # nothing loaded: nothing to empty
    assert alive_when_emptied == [False]
