"""Statistics and invariants of span masking and negative sampling (fairseq_spec.md §1.4, §1.8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from repro.models.masking import compute_mask_indices, sample_cross_negatives, sample_negatives


def test_masked_fraction_matches_paper():
    # p = 0.65, M = 10: about 1 - (1 - 0.065)^10 = 49% of frames (paper: "about 49%").
    rng = np.random.default_rng(0)
    mask = compute_mask_indices((400, 500), None, 0.65, 10, min_masks=2, require_same_masks=False, rng=rng)
    fraction = mask.mean()
    assert 0.47 <= fraction <= 0.51, fraction
    # Spans merge: mean run length well above 10 (paper: 14.7).
    runs = np.diff(np.concatenate([np.zeros((400, 1)), mask, np.zeros((400, 1))], axis=1).astype(int), axis=1)
    run_lengths = np.argwhere(runs == -1)[:, 1] - np.argwhere(runs == 1)[:, 1]
    assert 12.0 <= run_lengths.mean() <= 17.0, run_lengths.mean()
    # The last frame can never be masked (starts <= T - 11).
    assert not mask[:, -1].any()


def test_span_count_uses_probabilistic_rounding():
    # num_spans = int(mask_prob * T / M + u) = int(3.25 + u): 3 or 4, 3.25 on average. With length-1
    # spans (starts drawn without replacement) every span is exactly one masked frame.
    rng = np.random.default_rng(1)
    mask = compute_mask_indices((20000, 50), None, 0.065, 1, require_same_masks=False, rng=rng)
    counts = mask.sum(1)
    assert set(np.unique(counts).tolist()) == {3, 4}
    assert abs(counts.mean() - 3.25) < 0.02


def test_padded_frames_never_masked_and_rows_equalized():
    rng = np.random.default_rng(2)
    padding = np.zeros((6, 120), dtype=bool)
    for row, length in enumerate([120, 100, 80, 60, 40, 30]):
        padding[row, length:] = True
    for _ in range(50):
        mask = compute_mask_indices((6, 120), torch.from_numpy(padding), 0.65, 10, min_masks=2, rng=rng)
        assert not (mask & padding).any()
        counts = mask.sum(1)
        assert (counts == counts[0]).all() and counts[0] > 0


def test_same_seed_same_mask_and_mask_dropout():
    first = compute_mask_indices((4, 200), None, 0.65, 10, min_masks=2, rng=np.random.default_rng(7))
    second = compute_mask_indices((4, 200), None, 0.65, 10, min_masks=2, rng=np.random.default_rng(7))
    other = compute_mask_indices((4, 200), None, 0.65, 10, min_masks=2, rng=np.random.default_rng(8))
    assert np.array_equal(first, second) and not np.array_equal(first, other)
    dropped = compute_mask_indices(
        (4, 200), None, 0.65, 10, min_masks=2, mask_dropout=0.5, rng=np.random.default_rng(7)
    )
    assert dropped.sum(1).tolist() == [int(first[0].sum() - np.rint(first[0].sum() * 0.5))] * 4
    assert not (dropped[0] & ~first[0]).any()  # row 0 draws the same spans, dropout only removes frames
    assert (dropped.sum(1) < first.sum(1)).all()


def test_min_masks_and_unsupported_selection():
    mask = compute_mask_indices(
        (3, 30), None, 0.0, 5, min_masks=2, require_same_masks=False, rng=np.random.default_rng(0)
    )
    assert (mask.sum(1) >= 5).all()
    with pytest.raises(ValueError, match="mask_selection"):
        compute_mask_indices((1, 30), None, 0.5, 5, mask_selection="poisson", rng=np.random.default_rng(0))


def test_negatives_never_self_and_uniform():
    gen = torch.Generator().manual_seed(0)
    negatives = sample_negatives(num_masked_per_row=9, batch_size=50, num_negatives=400, rng=gen)
    assert negatives.shape == (50, 9, 400)
    own = torch.arange(9).view(1, 9, 1)
    assert not (negatives == own).any()
    assert negatives.min() >= 0 and negatives.max() <= 8
    # Uniform over the 8 other frames: each gets about 1/8 of the draws of a position.
    counts = torch.stack([(negatives[:, 4] == j).float().mean() for j in range(9)])
    assert counts[4] == 0 and torch.allclose(counts[torch.arange(9) != 4], torch.full((8,), 1 / 8), atol=0.01)
    again = sample_negatives(9, 50, 400, torch.Generator().manual_seed(0))
    assert torch.equal(negatives, again)


def test_cross_negatives_cover_the_batch():
    negatives = sample_cross_negatives(5, 4, 300, torch.Generator().manual_seed(0))
    assert negatives.shape == (4, 5, 300)
    assert negatives.min() >= 0 and negatives.max() <= 19
    assert len(torch.unique(negatives[2, 1])) == 19  # every flat index but the skipped one
