"""`python -m repro.tools dictionary LTR [LTR...] --dest dict.ltr.txt`: the letter dictionary.

Writes fairseq's `symbol count` lines for every token of the label files, most frequent first,
ties broken by symbol (what `fairseq-preprocess --only-source` + `Dictionary.finalize` give);
the four specials `<s> <pad> </s> <unk>` are implicit and never written (fairseq_spec.md §3.3).
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from repro.data.dictionary import SPECIAL_SYMBOLS, Dictionary


def count_tokens(lines: Iterable[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in lines:
        counts.update(line.split())
    for special in SPECIAL_SYMBOLS:
        counts.pop(special, None)
    return counts


def dictionary_from_counts(counts: Counter[str]) -> Dictionary:
    """Symbols by count descending, ties by symbol."""
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    dictionary = Dictionary.from_symbols(symbol for symbol, _ in ordered)
    for symbol, count in ordered:
        dictionary.counts[dictionary.index(symbol)] = count
    return dictionary


def write_dictionary(label_paths: Iterable[str | Path], dest: str | Path) -> Dictionary:
    counts: Counter[str] = Counter()
    for path in label_paths:
        counts.update(count_tokens(Path(path).read_text(encoding="utf-8").splitlines()))
    dictionary = dictionary_from_counts(counts)
    Path(dest).parent.mkdir(parents=True, exist_ok=True)
    dictionary.save(dest)
    return dictionary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", nargs="+", metavar="LTR", help="label files (.ltr), one utterance a line")
    parser.add_argument("--dest", default="dict.ltr.txt", help="output dictionary file")


def main(args: argparse.Namespace) -> int:
    try:
        dictionary = write_dictionary(args.labels, args.dest)
    except OSError as error:
        print(f"dictionary: {error}", file=sys.stderr)
        return 1
    print(f"dictionary: {len(dictionary) - dictionary.nspecial} symbols -> {args.dest}", file=sys.stderr)
    return 0
