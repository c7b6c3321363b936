"""`python -m repro.tools synth-corpus DEST [--hours H] [--seed S]`: write the synthetic speech corpus.

LibriSpeech / Libri-light layout with espeak-ng speech, plus the LM text, lexicon and KenLM 4-gram
(see repro.data.synth). Same seed and hours -> the same bytes.
"""

from __future__ import annotations

import argparse
import sys
import time

from repro.data.synth import CorpusError, make_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dest", help="output directory (LibriSpeech layout is written under it)")
    parser.add_argument("--hours", type=float, default=1.0,
                        help="total audio over all splits (default 1.0: the `make demo` size)")
    parser.add_argument("--seed", type=int, default=0, help="seed for text, voices, noise and espeak")
    parser.add_argument("--workers", type=int, default=None,
                        help="synthesis processes (default min(2, cores)); does not change the output")
    parser.add_argument("--lm-sentences", type=int, default=None,
                        help="sentences of LM training text (default scales with --hours, 3000..40000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a different or unfinished corpus already in DEST")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    start = time.monotonic()
    try:
        info = make_corpus(args.dest, hours=args.hours, seed=args.seed, workers=args.workers,
                           lm_sentence_count=args.lm_sentences, overwrite=args.overwrite,
                           progress=not args.quiet)
    except CorpusError as error:
        print(f"synth-corpus: {error}", file=sys.stderr)
        return 1
    leaves = ("pretrain", "finetune_10min", "finetune_1h", "finetune_10h", "dev-clean", "dev-other",
              "test-clean", "test-other")
    for name in leaves:
        split = info.splits[name]
        print(f"{name:16s} {split.hours * 60:7.2f} min  {split.utterances:5d} utterances  "
              f"{split.speakers:3d} speakers")
    print(f"{len(info.speakers)} speakers, vocabulary {info.vocabulary_size} words, "
          f"{info.lm_sentences} LM sentences, espeak-ng {info.espeak_version}; "
          f"{info.root} in {time.monotonic() - start:.1f} s")
    return 0
