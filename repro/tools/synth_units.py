"""`python -m repro.tools synth-units DEST [--utterances N] [--seed S]`: a synthetic unit corpus.

Writes what `tokenize` writes for speech, so a RoBERTa row runs without a vq-wav2vec model:
`DEST/dict.txt` (fairseq Dictionary lines `<code> <count>`) and `DEST/{train,valid}.src` (one utterance
of vq-wav2vec style codes `a-b` per line). The units are word-like code sequences with each code held
1-3 frames (repro.data.units.synthetic_unit_corpus); same seed, same bytes.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from repro.data.units import synthetic_codes, synthetic_unit_corpus, unigram_accuracy


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", type=Path, help="output directory")
    parser.add_argument("--utterances", type=int, default=2000, help="training utterances (valid: a tenth more)")
    parser.add_argument("--codes-per-group", type=int, default=8, help="codes per quantizer group (2 groups)")
    parser.add_argument("--seed", type=int, default=0)


def write_units(dest: Path, utterances: int, codes_per_group: int, seed: int) -> dict[str, list[str]]:
    codes = synthetic_codes(per_group=codes_per_group)
    lines = synthetic_unit_corpus(utterances + utterances // 10, np.random.default_rng(seed), codes)
    splits = {"train": lines[:utterances], "valid": lines[utterances:]}
    dest.mkdir(parents=True, exist_ok=True)
    counts = Counter(code for line in splits["train"] for code in line.split())
    # fairseq preprocess order: by count, most frequent first (ties by first appearance)
    (dest / "dict.txt").write_text("".join(f"{code} {count}\n" for code, count in counts.most_common()),
                                   encoding="utf-8")
    for split, rows in splits.items():
        (dest / f"{split}.src").write_text("".join(row + "\n" for row in rows), encoding="utf-8")
    return splits


def main(args: argparse.Namespace) -> int:
    splits = write_units(args.dest, args.utterances, args.codes_per_group, args.seed)
    tokens = sum(len(line.split()) for line in splits["train"])
    print(f"{args.dest}: {len(splits['train'])} train / {len(splits['valid'])} valid utterances, {tokens} train "
          f"tokens; unigram MLM accuracy on valid {unigram_accuracy(splits['valid']):.3f}")
    return 0
