"""Raw-audio dataset and its collater, with fairseq's `FileAudioDataset` semantics (fairseq_spec.md §4.1).

* Manifest rows shorter than `min_sample_size` are dropped; their row numbers are kept in
  `skipped_indices` so `load_labels` drops the same label lines (§3.3, trap 14).
* Items: the whole waveform, channels averaged, optionally `F.layer_norm`-normalized over the
  whole utterance (eps 1e-5, no affine) before any crop.
* Collater: pretraining (`pad=False`) crops every item to the shortest one in the batch (at most
  `max_sample_size`); fine-tuning (`pad=True`) right-pads with 0.0 and a `padding_mask`, cropping
  only beyond `max_sample_size`. Crops start at a random offset - in validation too - drawn from
  the generator the caller passes, so a run replays exactly.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from repro.data.audio import AudioError, read_audio
from repro.data.dictionary import Dictionary
from repro.data.lines import read_lines
from repro.data.manifest import read_manifest

log = logging.getLogger(__name__)

MAX_UNKNOWN_FRACTION = 0.001
"""Share of a label file's tokens that may be missing from the dictionary with only a warning."""


class LabelError(ValueError):
    """Labels that do not line up with their manifest or dictionary (the message names the files)."""


def normalize_waveform(waveform: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the whole utterance (fairseq: `F.layer_norm(wav, wav.shape)`)."""
    with torch.no_grad():
        return F.layer_norm(waveform, waveform.shape)


def crop_offset(size: int, target_size: int, rng: np.random.Generator | None) -> int:
    """Start of a random `target_size` window in `size` samples (uniform over diff + 1 starts)."""
    difference = size - target_size
    if difference <= 0:
        return 0
    if rng is None:
        raise ValueError("cropping a batch needs a numpy Generator: pass collater(samples, rng)")
    return int(rng.integers(0, difference + 1))


def collate_targets(targets: Sequence[torch.Tensor], pad_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, S) targets and their (B,) lengths."""
    lengths = torch.tensor([len(target) for target in targets], dtype=torch.long)
    max_length = int(lengths.max()) if len(targets) else 0
    padded = torch.full((len(targets), max_length), pad_index, dtype=torch.long)
    for row, target in enumerate(targets):
        padded[row, : len(target)] = target
    return padded, lengths


class FileAudioDataset(Dataset):
    """Audio files of a manifest (`<split>.tsv`), optionally with per-row label indices."""

    def __init__(
        self,
        manifest_path: str | Path,
        sample_rate: int = 16_000,
        max_sample_size: int | None = None,
        min_sample_size: int = 0,
        pad: bool = False,
        normalize: bool = False,
        labels: list[list[int]] | None = None,
        pad_index: int = 1,
    ) -> None:
        self.manifest_path = Path(manifest_path)
        manifest = read_manifest(self.manifest_path)
        self.root = manifest.root
        self.sample_rate = sample_rate
        self.max_sample_size = max_sample_size
        self.min_sample_size = min_sample_size or 0
        # fairseq pads whenever there are labels (audio_finetuning), whatever enable_padding says.
        self.pad = pad or labels is not None
        self.normalize = normalize
        self.pad_index = pad_index
        self.manifest_rows = len(manifest.entries)
        """Rows of the manifest before the min_sample_size filter (what a label file must match)."""

        kept = [
            row for row, entry in enumerate(manifest.entries) if entry.num_samples >= self.min_sample_size
        ]
        self.skipped_indices: set[int] = set(range(self.manifest_rows)) - set(kept)
        self.rel_paths = [manifest.entries[row].rel_path for row in kept]
        self.sizes = np.array([manifest.entries[row].num_samples for row in kept], dtype=np.int64)
        self.manifest_line_numbers = [row + 2 for row in kept]  # for error messages (line 1 = root)
        if labels is not None and len(labels) != len(kept):
            raise LabelError(
                f"{len(labels)} label rows for {len(kept)} audio rows of {self.manifest_path} "
                f"({self.manifest_rows} rows, {len(self.skipped_indices)} shorter than min_sample_size)"
            )
        self.labels = labels

    def __len__(self) -> int:
        return len(self.sizes)

    def audio_path(self, index: int) -> Path:
        return self.root / self.rel_paths[index]

    def num_tokens(self, index: int) -> int:
        """Samples this item occupies in a batch (fairseq `size`): cropped unless padding."""
        return int(self.num_tokens_vec()[index])

    def num_tokens_vec(self) -> np.ndarray:
        """`num_tokens` of every item, (N,) int64 - what `batch_by_size` needs."""
        if self.pad or self.max_sample_size is None:
            return self.sizes
        return np.minimum(self.sizes, self.max_sample_size)

    def __getitem__(self, index: int) -> dict[str, Any]:
        # read_audio names the file on any failure (unreadable, truncated, wrong rate); add its manifest line.
        try:
            samples = read_audio(self.audio_path(index), self.sample_rate, int(self.sizes[index]))
        except AudioError as error:
            where = f"{self.manifest_path}:{self.manifest_line_numbers[index]}"
            raise AudioError(error.path, f"{error.reason} (manifest row {where})") from error
        waveform = torch.from_numpy(samples)
        if self.normalize:
            waveform = normalize_waveform(waveform)
        item: dict[str, Any] = {"id": index, "source": waveform}
        if self.labels is not None:
            item["target"] = torch.tensor(self.labels[index], dtype=torch.long)
        return item

    def collater(
        self, samples: Sequence[dict[str, Any]], rng: np.random.Generator | None = None
    ) -> dict[str, Any]:
        """Batch dict (see module docstring); {} for an empty list (fairseq's dummy batch)."""
        samples = [sample for sample in samples if sample.get("source") is not None]
        if not samples:
            return {}
        sources = [sample["source"] for sample in samples]
        sizes = [len(source) for source in sources]
        limit = self.max_sample_size if self.max_sample_size is not None else max(sizes)
        target_size = min(max(sizes), limit) if self.pad else min(min(sizes), limit)

        collated = sources[0].new_zeros(len(sources), target_size)  # (B, L)
        padding_mask = torch.zeros(len(sources), target_size, dtype=torch.bool) if self.pad else None
        for row, (source, size) in enumerate(zip(sources, sizes)):
            if size >= target_size:
                start = crop_offset(size, target_size, rng)
                collated[row] = source[start : start + target_size]
            else:  # only in pad mode: right-pad with zeros, mask the padding
                collated[row, :size] = source
                assert padding_mask is not None
                padding_mask[row, size:] = True

        batch: dict[str, Any] = {
            "id": torch.tensor([sample["id"] for sample in samples], dtype=torch.long),
            "net_input": {"source": collated, "padding_mask": padding_mask},
        }
        if self.labels is not None:
            target, target_lengths = collate_targets([sample["target"] for sample in samples], self.pad_index)
            batch["target"] = target
            batch["target_lengths"] = target_lengths
            batch["ntokens"] = int(target_lengths.sum())
        else:
            # No labels (pretraining): count the real audio samples in the batch.
            batch["ntokens"] = (
                int(padding_mask.logical_not().sum()) if padding_mask is not None else collated.numel()
            )
        return batch


def load_labels(
    label_path: str | Path,
    dictionary: Dictionary,
    skipped_indices: set[int] | Sequence[int],
    expected_count: int,
    manifest_path: str | Path | None = None,
) -> list[list[int]]:
    """Encoded label lines of `label_path`, without the rows the dataset skipped.

    `expected_count` is the number of rows of the manifest (before the min_sample_size filter,
    `FileAudioDataset.manifest_rows`); a label file with another line count is an error naming
    both files and both counts (fairseq asserts the same after filtering).
    """
    label_path = Path(label_path)
    try:
        lines = read_lines(label_path)
    except (OSError, UnicodeDecodeError) as error:
        raise LabelError(f"{label_path}: cannot read labels: {error}") from error
    if len(lines) != expected_count:
        manifest_name = str(manifest_path) if manifest_path is not None else "its manifest"
        raise LabelError(
            f"{label_path} has {len(lines)} lines but {manifest_name} has {expected_count} audio rows; "
            "labels must have one line per manifest row"
        )
    skipped = set(skipped_indices)
    kept = [(row + 1, line) for row, line in enumerate(lines) if row not in skipped]  # (line number, text)
    check_unknown_symbols(label_path, kept, dictionary)
    return [dictionary.encode_line(line) for _, line in kept]


def check_unknown_symbols(
    label_path: str | Path,
    numbered_lines: Sequence[tuple[int, str]],
    dictionary: Dictionary,
    max_fraction: float = MAX_UNKNOWN_FRACTION,
) -> int:
    """Count label tokens missing from `dictionary`; warn, or raise `LabelError` above `max_fraction`.

    fairseq encodes such tokens as `<unk>` without a word, so a lower-case or otherwise foreign
    label file trains (towards `<unk>`) with exit code 0. Returns the number of unknown tokens.
    """
    counts: Counter[str] = Counter()
    first_line: dict[str, int] = {}
    total = 0
    for line_number, line in numbered_lines:
        for token in line.split():  # the tokens `Dictionary.encode_line` encodes
            total += 1
            if token not in dictionary:
                counts[token] += 1
                first_line.setdefault(token, line_number)
    unknown = sum(counts.values())
    if not unknown:
        return 0
    shown = 8
    listed = ", ".join(
        f"{symbol!r} x{count} (first on line {first_line[symbol]})" for symbol, count in counts.most_common(shown)
    )
    if len(counts) > shown:
        listed += f" and {len(counts) - shown} other symbols"
    message = (
        f"{label_path}:{min(first_line.values())}: {unknown} of {total} label tokens ({unknown / total:.2%}) "
        f"are not in {dictionary.path or 'the dictionary'} and would become <unk>: {listed}"
    )
    if unknown > max_fraction * total:
        raise LabelError(
            f"{message}. More than {max_fraction:.1%} unknown is refused: write the labels in the dictionary's "
            "symbols (fairseq's LibriSpeech letters are upper case, '|' between words) or add the missing "
            "symbols to the dictionary"
        )
    log.warning("%s (at most %.1f%% is tolerated; training goes on)", message, 100 * max_fraction)
    return unknown
