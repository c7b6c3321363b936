"""Span masks and negative sampling of wav2vec 2.0 (fairseq_spec.md §1.4, §1.8).

Pure functions: every random draw comes from a generator the caller passes, so a training run that
derives its generators from (seed, update, micro-batch, rank) replays its masks and negatives exactly.
"""

from __future__ import annotations

import numpy as np
import torch


def compute_mask_indices(
    shape: tuple[int, int],
    padding_mask: np.ndarray | torch.Tensor | None,
    mask_prob: float,
    mask_length: int,
    *,
    mask_selection: str = "static",
    mask_other: float = 0.0,
    min_masks: int = 0,
    no_overlap: bool = False,
    min_space: int = 0,
    require_same_masks: bool = True,
    mask_dropout: float = 0.0,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean (batch, frames) mask of random spans, fairseq's static-selection algorithm (§1.4).

    Per row: ``num_spans = max(min_masks, int(mask_prob * size / mask_length + u))`` with u ~ U[0, 1)
    (probabilistic rounding, drawn per row as in fairseq HEAD), span starts drawn without replacement
    in ``[0, size - mask_length)``, overlapping spans merge, padded frames are never masked. With
    ``require_same_masks`` every row is cut to the batch minimum of masked frames by removing random
    masked frames; ``mask_dropout`` then un-masks ``round(n * mask_dropout)`` random frames per row.
    """
    if mask_selection != "static":
        raise ValueError(
            f"mask_selection={mask_selection!r} is not supported: only 'static' is used by the wav2vec 2.0 "
            "recipes (fairseq HEAD's other length distributions are broken, fairseq_spec.md §1.4)"
        )
    if no_overlap:
        raise ValueError(
            "no_mask_overlap=True is not supported (unused by the recipes, broken in fairseq HEAD)"
        )
    del mask_other, min_space  # only meaningful for the unsupported selections above
    batch_size, num_frames = shape
    if mask_length < 1:
        raise ValueError(f"mask_length must be >= 1, got {mask_length}")
    if padding_mask is not None:
        padding = np.asarray(
            padding_mask.detach().cpu().numpy() if isinstance(padding_mask, torch.Tensor) else padding_mask
        ).astype(bool)
        row_sizes = num_frames - padding.sum(axis=1)
    else:
        row_sizes = np.full(batch_size, num_frames)

    row_indices: list[np.ndarray] = []
    for size in row_sizes.tolist():
        num_spans = max(min_masks, int(mask_prob * size / float(mask_length) + rng.random()))
        if num_spans == 0:
            row_indices.append(np.zeros(0, dtype=np.int64))
            continue
        # fairseq shrinks the start range when the spans cannot all fit (short rows).
        start_range_end = mask_length
        if size - start_range_end <= num_spans:
            start_range_end = size - num_spans - 1
        if size - start_range_end < num_spans or size - start_range_end <= 0:
            raise ValueError(
                f"cannot place {num_spans} mask spans of length {mask_length} in a row of {size} frames"
            )
        starts = rng.choice(size - start_range_end, num_spans, replace=False)
        spans = (starts[:, None] + np.arange(mask_length)[None, :]).reshape(-1)
        row_indices.append(np.unique(spans[spans < size]))

    target_len = min(len(indices) for indices in row_indices) if row_indices else 0
    mask = np.zeros((batch_size, num_frames), dtype=bool)
    for row, indices in enumerate(row_indices):
        if require_same_masks and len(indices) > target_len:
            indices = rng.choice(indices, target_len, replace=False)
        if mask_dropout > 0:
            num_holes = int(np.rint(len(indices) * mask_dropout))
            indices = rng.choice(indices, len(indices) - num_holes, replace=False)
        mask[row, indices] = True
    return mask


def sample_negatives(
    num_masked_per_row: int,
    batch_size: int,
    num_negatives: int,
    rng: torch.Generator,
) -> torch.Tensor:
    """Row-local negative indices (batch, M, K) over the M masked frames of each utterance (§1.8).

    Uniform with replacement over the *other* masked frames of the same row: draw in [0, M-2], then
    shift draws >= own position by one, so the positive is never its own negative. With M < 2 there
    is no other frame; the own index is returned and the logits mask it to -inf (neg_is_pos).
    """
    num = num_masked_per_row
    if num < 2 or num_negatives == 0:
        own = torch.arange(num).view(1, num, 1)
        return own.expand(batch_size, num, num_negatives).clone()
    draws = torch.randint(0, num - 1, (batch_size, num, num_negatives), generator=rng)
    own = torch.arange(num).view(1, num, 1)
    return draws + (draws >= own).long()


def sample_cross_negatives(
    num_masked_per_row: int,
    batch_size: int,
    num_negatives: int,
    rng: torch.Generator,
) -> torch.Tensor:
    """Flat negative indices (batch, M, K) into the (batch * M) masked frames of the whole batch (§1.8).

    Same skip trick as `sample_negatives`, but fairseq compares the draw with the row-local position t
    (not b * M + t), so a frame can draw itself; kept as in fairseq (neg_is_pos masks it).
    """
    num = num_masked_per_row
    total = batch_size * num
    if total < 2 or num_negatives == 0:
        own = torch.arange(total).view(batch_size, num, 1)
        return own.expand(batch_size, num, num_negatives).clone()
    draws = torch.randint(0, total - 1, (batch_size, num, num_negatives), generator=rng)
    own = torch.arange(num).view(1, num, 1)
    return draws + (draws >= own).long()
