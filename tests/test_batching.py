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
