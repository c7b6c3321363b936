"""Discrete speech units as RoBERTa reads them: unit files, their dictionary, span masking, batches.

Files (fairseq's vq-wav2vec featurize output and `preprocess --only-source` input):

* `<split>.src`: one utterance per line, space-separated code strings such as `12-304`
  (the indices of the two quantizer groups);
* `<split>.lbl`: the line of `<split>.<labels>` (e.g. `.ltr`) of each utterance, as vq-wav2vec_featurize.py
  copies it with `--labels` (and `repro.tools tokenize` does); CTC fine-tuning reads `<split>.<labels>`
  when present, else this file (`unit_labels_path`);
* `dict.txt`: `<code> <count>` lines, fairseq's Dictionary format. Indices are fairseq's: `<s> <pad>
  </s> <unk>` = 0..3, the codes in file order, then the masked_lm task appends `<mask>`.

A sample is `<s> units </s>` (fairseq's eos-terminated lines with `<s>` prepended, sample_break_mode
eos). Masking follows fairseq's MaskTokensDataset (masked_lm task) with the span options
(`mask_multiple_length`, `mask_stdev`) that implement the vq-wav2vec / 1911.03912 span masking.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from repro.data.dictionary import Dictionary
from repro.data.lines import read_lines

MASK_SYMBOL = "<mask>"


TOKENIZED_LABELS_EXT = "lbl"
"""The extension vq-wav2vec_featurize.py (and our tokenize) gives the label lines it copies beside `.src`."""


def unit_labels_path(data_dir: str | Path, split: str, labels: str) -> Path:
    """The label file of a unit split: `<split>.<labels>` (e.g. train.ltr), else `<split>.lbl`, what the
    tokenizer writes beside `<split>.src`; FileNotFoundError naming both when neither exists."""
    data_dir = Path(data_dir)
    own, tokenized = data_dir / f"{split}.{labels}", data_dir / f"{split}.{TOKENIZED_LABELS_EXT}"
    for path in (own, tokenized):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{own}: label file of split {split!r} not found (nor {tokenized.name}, what `repro.tools tokenize "
        f"--labels {labels}` writes beside {split}.src)"
    )


class UnitFileError(ValueError):
    """A unit file that does not fit its dictionary (the message names file, line and code)."""


def load_unit_dictionary(path: str | Path) -> tuple[Dictionary, int]:
    """`dict.txt` as fairseq's masked_lm task has it: the file's codes, then `<mask>`; returns (dict, mask index)."""
    dictionary = Dictionary.load(path)
    return dictionary, dictionary.add_symbol(MASK_SYMBOL)


def encode_units(line: str, dictionary: Dictionary, where: str) -> np.ndarray:
    """Code strings -> indices (int64); a code absent from the dictionary is an error naming `where`.

    fairseq would silently map it to `<unk>`: for units that means tokens from another quantizer.
    """
    codes = line.split()
    indices = np.fromiter((dictionary.index(code) for code in codes), dtype=np.int64, count=len(codes))
    unknown = np.flatnonzero(indices == dictionary.unk)
    if len(unknown):
        first = codes[int(unknown[0])]
        raise UnitFileError(
            f"{where}: code {first!r} (token {int(unknown[0]) + 1}) is not in the unit dictionary"
            f"{f' ({len(unknown)} unknown codes on this line)' if len(unknown) > 1 else ''}; the units and "
            "dict.txt must come from the same quantizer"
        )
    return indices


def read_unit_file(path: str | Path, dictionary: Dictionary) -> list[np.ndarray]:
    """Every line of a unit file as dictionary indices (no specials)."""
    path = Path(path)
    try:
        lines = read_lines(path)
    except OSError as error:
        raise UnitFileError(f"{path}: cannot read unit file: {error}") from error
    return [encode_units(line, dictionary, f"{path}:{number}") for number, line in enumerate(lines, start=1)]


def with_specials(units: np.ndarray, dictionary: Dictionary) -> np.ndarray:
    """`<s> units </s>` (int64)."""
    return np.concatenate([[dictionary.bos], units, [dictionary.eos]]).astype(np.int64)


# --- synthetic units -----------------------------------------------------------------------------


def synthetic_codes(groups: int = 2, per_group: int = 6, count: int | None = None) -> list[str]:
    """Code strings "a-b" like a 2-group vq-wav2vec quantizer writes, in dictionary order."""
    if groups != 2:
        raise ValueError("synthetic codes have 2 groups, as vq-wav2vec")
    codes = [f"{a}-{b}" for a in range(per_group) for b in range(per_group)]
    return codes[:count] if count is not None else codes


def synthetic_unit_corpus(count: int, rng: np.random.Generator, codes: list[str], words: int = 6,
                          word_length: int = 4) -> list[str]:
    """Utterances of unit 'words' (fixed code sequences, each code held 1-3 frames, 2-4 words per line).

    Speech units repeat over consecutive 10 ms frames and recur in word-like sequences; a masked LM
    can only beat the unigram baseline by using that context.
    """
    vocabulary = [rng.choice(len(codes), word_length, replace=False) for _ in range(words)]
    lines = []
    for _ in range(count):
        units: list[str] = []
        for word in rng.integers(0, words, rng.integers(2, 5)):
            for code in vocabulary[int(word)]:
                units.extend([codes[int(code)]] * int(rng.integers(1, 4)))
        lines.append(" ".join(units))
    return lines


def unigram_accuracy(lines: list[str]) -> float:
    """MLM accuracy of always predicting the most frequent symbol (<s> and </s> counted: they are maskable)."""
    counts: dict[str, int] = {}
    for line in lines:
        for code in ["<s>", *line.split(), "</s>"]:
            counts[code] = counts.get(code, 0) + 1
    return max(counts.values()) / sum(counts.values())


# --- masking ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaskingConfig:
    """fairseq masked_lm task options (see repro.config.TaskConfig for their meaning)."""

    mask_prob: float = 0.15
    leave_unmasked_prob: float = 0.1
    random_token_prob: float = 0.1
    mask_multiple_length: int = 1
    mask_stdev: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"task.mask_prob must be in (0, 1), got {self.mask_prob}")
        if self.random_token_prob < 0 or self.leave_unmasked_prob < 0 or \
                self.random_token_prob + self.leave_unmasked_prob > 1.0:
            raise ValueError("task.random_token_prob and task.leave_unmasked_prob must be >= 0 with sum <= 1")
        if self.mask_multiple_length < 1 or self.mask_stdev < 0:
            raise ValueError("task.mask_multiple_length must be >= 1 and task.mask_stdev >= 0")


def span_mask(size: int, cfg: MaskingConfig, rng: np.random.Generator) -> np.ndarray:
    """Boolean (size,) mask: fairseq's MaskTokensDataset span selection.

    `int(mask_prob * size / mask_multiple_length + u)` span starts (u ~ U[0,1): probabilistic
    rounding) drawn without replacement, each span N(mask_multiple_length, mask_stdev) long (rounded,
    at least 0) or exactly mask_multiple_length when mask_stdev = 0; spans may overlap and are cut
    at the end. With mask_prob 0.5, length 10: 5% of the tokens start a span, about 40% are masked.
    """
    mask = np.zeros(size, dtype=bool)
    num_spans = int(cfg.mask_prob * size / float(cfg.mask_multiple_length) + rng.random())
    starts = rng.choice(size, num_spans, replace=False)
    if cfg.mask_stdev > 0.0:
        lengths = np.maximum(0, np.rint(rng.normal(cfg.mask_multiple_length, cfg.mask_stdev, num_spans)))
        positions = np.concatenate([start + np.arange(int(length)) for start, length in zip(starts, lengths)]
                                   + [np.zeros(0, dtype=np.int64)])
    else:
        positions = (starts[:, None] + np.arange(cfg.mask_multiple_length)[None, :]).reshape(-1)
    mask[positions[positions < size].astype(np.int64)] = True
    return mask


def mask_units(item: np.ndarray, cfg: MaskingConfig, mask_index: int, random_weights: np.ndarray | None,
               pad_index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(masked input, target) for one sample, fairseq's masked_lm: the target holds the original token at
    every selected position and pad elsewhere; of the selected positions, `leave_unmasked_prob` keep
    their token, `random_token_prob` get a random symbol (weights `random_weights`), the rest `<mask>`.

    Every position may be selected, `<s>` and `</s>` included, as in fairseq.
    """
    size = len(item)
    mask = span_mask(size, cfg, rng)
    target = np.full(size, pad_index, dtype=np.int64)
    target[mask] = item[mask]
    unmask = random = None
    either = cfg.random_token_prob + cfg.leave_unmasked_prob
    if either > 0.0:
        changed = mask & (rng.random(size) < either)
        if cfg.random_token_prob == 0.0:
            unmask = changed
        elif cfg.leave_unmasked_prob == 0.0:
            random = changed
        else:
            keep = rng.random(size) < cfg.leave_unmasked_prob / either
            unmask, random = changed & keep, changed & ~keep
    if unmask is not None:
        mask = mask ^ unmask
    source = item.copy()
    source[mask] = mask_index
    if random is not None and random.any():
        assert random_weights is not None
        source[random] = rng.choice(len(random_weights), int(random.sum()), p=random_weights)
    return source, target


def random_token_weights(dictionary: Dictionary) -> np.ndarray:
    """Uniform over every symbol but the 4 specials (fairseq without freq_weighted_replacement)."""
    weights = np.ones(len(dictionary))
    weights[: dictionary.nspecial] = 0
    return weights / weights.sum()


def pad_rows(rows: list[np.ndarray], pad_index: int) -> torch.Tensor:
    """Right-padded (B, T) int64 tensor."""
    width = max(len(row) for row in rows)
    padded = torch.full((len(rows), width), pad_index, dtype=torch.long)
    for index, row in enumerate(rows):
        padded[index, : len(row)] = torch.from_numpy(np.asarray(row, dtype=np.int64))
    return padded


# --- datasets -----------------------------------------------------------------------------------


class UnitDataset:
    """`<s> units </s>` per line of a unit file; lines longer than `max_positions` are skipped (with
    `skip_too_long`, fairseq's skip_invalid_size_inputs_valid_test) or an error naming the line."""

    def __init__(self, path: str | Path, dictionary: Dictionary, max_positions: int | None = None,
                 skip_too_long: bool = False) -> None:
        self.path = self.manifest_path = Path(path)  # manifest_path: the name batching errors cite
        self.dictionary = dictionary
        items = [with_specials(units, dictionary) for units in read_unit_file(self.path, dictionary)]
        self.line_count = len(items)
        keep = list(range(len(items)))
        if max_positions is not None:
            too_long = [i for i, item in enumerate(items) if len(item) > max_positions]
            if too_long and not skip_too_long:
                raise UnitFileError(
                    f"{self.path}:{too_long[0] + 1}: {len(items[too_long[0]])} tokens with <s> and </s> > "
                    f"max_positions={max_positions} ({len(too_long)} such lines); raise model.max_positions or "
                    "set dataset.skip_invalid_size_inputs_valid_test=true to skip them"
                )
            keep = [i for i in keep if i not in set(too_long)]
        self.items = [items[i] for i in keep]
        self.kept_lines = np.array(keep, dtype=np.int64)  # 0-based line of every item
        self.manifest_line_numbers = self.kept_lines + 1
        self.rel_paths = [f"{self.path.name}:{line}" for line in self.manifest_line_numbers]
        self.sizes = np.array([len(item) for item in self.items], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def num_tokens_vec(self) -> np.ndarray:
        return self.sizes


class MaskedUnitDataset(UnitDataset):
    """Unit utterances for masked-LM training; masks are drawn in `collater` from the trainer's rng
    (seeded by seed, epoch and batch position), so a resumed run masks every batch the same way."""

    def __init__(self, path: str | Path, dictionary: Dictionary, mask_index: int, masking: MaskingConfig,
                 max_positions: int | None = None, skip_too_long: bool = False) -> None:
        super().__init__(path, dictionary, max_positions, skip_too_long)
        self.mask_index = mask_index
        self.masking = masking
        self.random_weights = random_token_weights(dictionary) if masking.random_token_prob > 0 else None

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"id": index, "tokens": self.items[index]}

    def collater(self, samples: list[dict[str, Any]], rng: np.random.Generator | None = None) -> dict[str, Any]:
        if not samples:
            return {}
        rng = rng if rng is not None else np.random.default_rng(0)
        pad = self.dictionary.pad
        sources, targets = zip(*(mask_units(sample["tokens"], self.masking, self.mask_index, self.random_weights,
                                            pad, rng) for sample in samples))
        return {
            "id": torch.tensor([sample["id"] for sample in samples], dtype=torch.long),
            "net_input": {"src_tokens": pad_rows(list(sources), pad)},  # (B, T)
            "target": pad_rows(list(targets), pad),  # (B, T): pad except at the predicted positions
            "ntokens": int(sum(len(source) for source in sources)),
            "nsentences": len(samples),
        }


class LabeledUnitDataset(UnitDataset):
    """Unit utterances with letter targets for CTC (`<split>.src` beside `<split>.ltr` or `.lbl`, line by line).

    `labels` has one entry per line of the unit file; the skipped lines' labels are dropped with them.
    """

    def __init__(self, path: str | Path, dictionary: Dictionary, labels: list[list[int]], pad_index: int,
                 max_positions: int | None = None, skip_too_long: bool = False) -> None:
        super().__init__(path, dictionary, max_positions, skip_too_long)
        if len(labels) != self.line_count:
            raise UnitFileError(f"{self.path} has {self.line_count} lines but its labels have {len(labels)}")
        self.labels = [labels[i] for i in self.kept_lines]
        self.pad_index = pad_index

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"id": index, "tokens": self.items[index], "target": self.labels[index]}

    def collater(self, samples: list[dict[str, Any]], rng: np.random.Generator | None = None) -> dict[str, Any]:
        if not samples:
            return {}
        targets = [np.asarray(sample["target"], dtype=np.int64) for sample in samples]
        target_lengths = torch.tensor([len(target) for target in targets], dtype=torch.long)
        return {
            "id": torch.tensor([sample["id"] for sample in samples], dtype=torch.long),
            "net_input": {"src_tokens": pad_rows([sample["tokens"] for sample in samples], self.dictionary.pad)},
            "target": pad_rows(targets, self.pad_index),  # (B, S)
            "target_lengths": target_lengths,
            "ntokens": int(target_lengths.sum()),
            "nsentences": len(samples),
        }
