"""Max-tokens batching (fairseq batch_by_size) and the resumable batch sampler."""

import itertools

import numpy as np
import pytest

from repro.data.batching import StatefulBatchSampler, batch_by_size, ordered_indices


def reference_batches(order, sizes, max_tokens, max_sentences, multiple):
    """Slow, obviously-correct statement of fairseq's rule (quadratic; for the test only)."""
    batches, start = [], 0
    while start < len(order):
        count = 0
        for end in range(start + 1, len(order) + 1):
            window = order[start:end]
            fits = max(sizes[i] for i in window) * len(window) <= max_tokens and (
                max_sentences is None or len(window) <= max_sentences
            )
            if not fits:
                break
            count = len(window)
        if count > multiple:
            count -= count % multiple
        batches.append(list(order[start : start + count]))
        start += count
    return batches


@pytest.mark.parametrize("max_sentences", [None, 12])
def test_batch_by_size_obeys_max_tokens_and_matches_the_rule(max_sentences) -> None:
    rng = np.random.default_rng(3)
    sizes = rng.integers(1_000, 50_000, size=500)
    order = ordered_indices(sizes, max_sample_size=40_000, rng=rng)
    clipped = np.minimum(sizes, 40_000)
    batches = batch_by_size(clipped, 400_000, max_sentences, 8, indices=order)
    assert all(clipped[b].max() * len(b) <= 400_000 for b in batches)
    assert all(len(b) % 8 == 0 or len(b) < 8 for b in batches)
    assert np.array_equal(np.concatenate(batches), order)  # consecutive runs of the order, nothing lost
    assert [b.tolist() for b in batches] == reference_batches(
        order.tolist(), clipped, 400_000, max_sentences, 8
    )
    if max_sentences:
        assert max(len(b) for b in batches) <= max_sentences


def test_batch_by_size_rejects_an_item_longer_than_max_tokens() -> None:
    with pytest.raises(ValueError, match="item 1 has 500 tokens > max_tokens=400"):
        batch_by_size([100, 500, 10], 400)


def test_ordered_indices_length_descending_with_seeded_ties() -> None:
    sizes = np.array([5, 9, 5, 9, 5, 12, 9])
    first = ordered_indices(sizes, max_sample_size=9, rng=np.random.default_rng(1))
    assert np.array_equal(first, ordered_indices(sizes, 9, np.random.default_rng(1)))
    assert np.minimum(sizes, 9)[first].tolist() == [9, 9, 9, 9, 5, 5, 5]  # 12 clipped to 9 ties with the 9s
    clipped_orders = {tuple(ordered_indices(sizes, 9, np.random.default_rng(seed))) for seed in range(20)}
    assert {order[0] for order in clipped_orders} == {1, 3, 5, 6}  # random tie-breaks among the 9s
    orders = {tuple(ordered_indices(sizes, None, np.random.default_rng(seed))) for seed in range(20)}
    assert all(order[0] == 5 for order in orders)  # unclipped, 12 is strictly longest


def test_sampler_resume_gives_the_identical_remaining_sequence() -> None:
    batches = [np.arange(i * 3, i * 3 + 3) for i in range(10)]
    reference = StatefulBatchSampler(batches, seed=11)
    epoch1, epoch2 = list(reference), list(reference)
    assert sorted(map(tuple, epoch1)) == sorted(tuple(b.tolist()) for b in batches)
    assert epoch1 != epoch2  # reshuffled per epoch
    interrupted = StatefulBatchSampler(batches, seed=11)
    seen = list(itertools.islice(iter(interrupted), 4))
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "position": 4} and seen == epoch1[:4]
    resumed = StatefulBatchSampler(batches, seed=11)
    resumed.load_state_dict(state)
    assert list(resumed) == epoch1[4:] and list(resumed) == epoch2
    assert resumed.state_dict() == {"epoch": 3, "position": 0}
    assert list(StatefulBatchSampler(batches, seed=12)) != epoch1


def test_sampler_shards_cover_every_batch_once() -> None:
    batches = [np.array([i]) for i in range(7)]
    shards = [list(StatefulBatchSampler(batches, seed=0, num_shards=3, shard_id=k)) for k in range(3)]
    assert all(len(shard) == 3 for shard in shards)  # padded with empty batches
    flat = [b[0] for shard in shards for b in shard if b]
    assert sorted(flat) == list(range(7)) and sum(b == [] for shard in shards for b in shard) == 2
