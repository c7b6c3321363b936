"""Max-tokens batching and a resumable batch sampler (fairseq_spec.md §4.1).

`ordered_indices` + `batch_by_size` reproduce fairseq's batches: items sorted by length,
longest first with random tie-breaks, then consecutive runs of that order grouped greedily so
that `longest_in_batch * batch_size <= max_tokens`, batch sizes rounded down to a multiple of
`required_batch_size_multiple` when larger than it. `StatefulBatchSampler` shuffles the batch
order every epoch from (seed, epoch) and can resume mid-epoch at the exact next batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


def ordered_indices(
    sizes: np.ndarray, max_sample_size: int | None = None, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Indices by (clipped) length descending; ties in random order from `rng` (None: higher index first)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    clipped = sizes if max_sample_size is None else np.minimum(sizes, max_sample_size)
    tie_break = rng.permutation(len(sizes)) if rng is not None else np.arange(len(sizes))
    # lexsort sorts by the last key first; reversing gives length-descending order.
    return np.lexsort([tie_break, clipped])[::-1].astype(np.int64)


def batch_by_size(
    sizes: np.ndarray | Sequence[int],
    max_tokens: int | None,
    max_sentences: int | None = None,
    required_batch_size_multiple: int = 8,
    indices: np.ndarray | Sequence[int] | None = None,
) -> list[np.ndarray]:
    """Group `indices` (default: 0..N-1 in order) into batches of consecutive indices.

    `sizes[i]` is the number of tokens (samples) item `i` takes in a batch, indexed by item,
    not by position in `indices`. A batch grows while `max(size) * count <= max_tokens` and
    `count <= max_sentences`; when it must close, its size is rounded down to a multiple of
    `required_batch_size_multiple` if it exceeds that multiple (the rest starts the next
    batch). Same result as fairseq's `batch_by_size_vec`. Returns arrays of item indices.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.arange(len(sizes), dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64)
    token_limit = max_tokens if max_tokens is not None and max_tokens > 0 else 0
    sentence_limit = max_sentences if max_sentences is not None and max_sentences > 0 else 0
    multiple = max(1, required_batch_size_multiple)
    if token_limit == 0 and sentence_limit == 0:
        raise ValueError("batch_by_size needs max_tokens or max_sentences")
    ordered_sizes = sizes[order]
    if token_limit and len(order) and ordered_sizes.max() > token_limit:
        too_long = int(order[int(np.argmax(ordered_sizes))])
        raise ValueError(
            f"item {too_long} has {int(sizes[too_long])} tokens > max_tokens={token_limit}; "
            "raise max_tokens or set max_sample_size"
        )

    batches: list[np.ndarray] = []
    start, total = 0, len(order)
    while start < total:
        longest = 0
        end = start  # exclusive end of the batch being grown
        while end < total:
            candidate_longest = max(longest, int(ordered_sizes[end]))
            count = end - start + 1
            if (token_limit and candidate_longest * count > token_limit) or (
                sentence_limit and count > sentence_limit
            ):
                break
            longest = candidate_longest
            end += 1
        count = end - start
        # Closing on overflow or at the end of the data rounds the same way.
        if count > multiple:
            count -= count % multiple
        batches.append(order[start : start + count])
        start += count
    return batches


class StatefulBatchSampler:
    """Epochs of batches in a per-epoch shuffled order, resumable mid-epoch.

    Epochs count from 1. Iterating yields the current epoch's batches from `position` on, then
    moves to the next epoch. `state_dict()` is {"epoch", "position"} where position = batches
    already yielded in this epoch; a sampler built with the same batches and seed that loads it
    yields exactly the remaining batches. With a prefetching DataLoader the sampler runs ahead of
    training: save `{"epoch": sampler.epoch, "position": batches_consumed}` instead.

    With `num_shards > 1` (data parallel), shard `shard_id` takes every num_shards-th batch of the
    shuffled order, and shorter shards are filled with empty batches so every rank runs the
    same number of steps (fairseq's ShardedIterator; the collater turns [] into {}).
    """

    def __init__(
        self,
        batches: Sequence[np.ndarray | Sequence[int]],
        seed: int,
        shuffle: bool = True,
        num_shards: int = 1,
        shard_id: int = 0,
    ) -> None:
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} outside [0, {num_shards})")
        self.batches = [np.asarray(batch, dtype=np.int64) for batch in batches]
        self.seed = seed
        self.shuffle = shuffle
        self.num_shards = num_shards
        self.shard_id = shard_id
        self.epoch = 1
        self.position = 0

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This shard's batches of `epoch`, in order."""
        order = np.arange(len(self.batches))
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.batches))
        per_shard = -(-len(order) // self.num_shards)  # ceil
        mine = [self.batches[i].tolist() for i in order[self.shard_id :: self.num_shards]]
        return mine + [[] for _ in range(per_shard - len(mine))]

    def __len__(self) -> int:
        return -(-len(self.batches) // self.num_shards)

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.epoch_batches(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 1 or not 0 <= position <= len(self):
            raise ValueError(f"invalid sampler state {state} for {len(self)} batches per epoch")
        self.epoch, self.position = epoch, position
