"""`python -m repro.tools prepare-librispeech ROOT --dest DIR`: every split the papers use.

From a LibriSpeech / Libri-light tree already on disk, writes for each split of
`repro.data.librispeech.SPLITS` whose folders exist: `<split>.tsv` (manifest rooted at the
deepest directory holding all its folders), `<split>.wrd`, `<split>.ltr`; and one
`dict.ltr.txt` counted over the distinct utterances of the training splits. Splits whose
folders are absent are reported and skipped (`--require SPLIT` makes that an error); a summary
table closes the run. Each audio header is read once even when splits share files.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from repro.data.audio_headers import read_headers
from repro.data.librispeech import SPLITS, TranscriptError, locate_split
from repro.data.manifest import write_manifest
from repro.tools.dictionary import count_tokens, dictionary_from_counts
from repro.tools.labels import write_labels
from repro.tools.manifest import find_audio_files, report_skipped, split_entries

ASSUMED_SAMPLE_RATE = 16_000  # LibriSpeech; only used for the hours column of the summary


@dataclass
class SplitOutcome:
    name: str
    status: str
    """'written', 'absent' or 'failed'."""
    files: int = 0
    hours: float = 0.0
    skipped: int = 0
    note: str = ""


def _print_summary(outcomes: list[SplitOutcome]) -> None:
    header = f"{'split':<16} {'status':<8} {'files':>8} {'hours':>9} {'skipped':>8}  note"
    print(header, file=sys.stderr)
    print("-" * len(header), file=sys.stderr)
    for outcome in outcomes:
        print(
            f"{outcome.name:<16} {outcome.status:<8} {outcome.files:>8} {outcome.hours:>9.2f} "
            f"{outcome.skipped:>8}  {outcome.note}",
            file=sys.stderr,
        )


def prepare(
    root: str | Path,
    dest: str | Path,
    splits: list[str] | None = None,
    required: list[str] | None = None,
    strict: bool = False,
    workers: int | None = None,
    progress: bool = True,
) -> list[SplitOutcome]:
    """Write manifests, labels and dict.ltr.txt; returns one outcome per split considered.

    Raises `FileNotFoundError` when a required split is absent, `ValueError` for unknown split
    names or (with `strict`) unreadable audio, `TranscriptError` for audio without transcript.
    """
    root, dest = Path(root), Path(dest)
    names = splits or list(SPLITS)
    unknown = [name for name in [*names, *(required or [])] if name not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; known: {', '.join(SPLITS)}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")

    located: dict[str, list[Path]] = {}
    outcomes: dict[str, SplitOutcome] = {}
    for name in names:
        found, missing = locate_split(root, SPLITS[name])
        if missing:
            shown = ", ".join(missing) if len(missing) <= 3 else ", ".join(missing[:2]) + ", ..."
            note = f"missing {shown}" + (
                f" ({len(missing)} of {len(SPLITS[name].folders)} folders)" if len(missing) > 3 else ""
            )
            outcomes[name] = SplitOutcome(name, "absent", note=note)
        else:
            located[name] = found
    absent_required = [name for name in required or [] if name not in located]
    if absent_required:
        details = "; ".join(
            f"{name}: {outcomes[name].note}" if name in outcomes else f"{name}: not selected"
            for name in absent_required
        )
        raise FileNotFoundError(f"required split(s) absent under {root}: {details}")

    # Read every distinct file's header once (10m ⊂ 1h ⊂ 10h and train_clean_100 ⊂ train_960).
    files_by_split = {
        name: sorted({path for folder in folders for path in find_audio_files(folder, "flac")})
        for name, folders in located.items()
    }
    unique_files = sorted({path for paths in files_by_split.values() for path in paths})
    header_results = dict(
        zip(unique_files, read_headers(unique_files, workers=workers, progress=progress), strict=True)
    )

    dest.mkdir(parents=True, exist_ok=True)
    train_letters: dict[str, str] = {}  # audio path -> letters, so shared utterances count once
    all_letters: dict[str, str] = {}
    for name, folders in located.items():
        paths = files_by_split[name]
        manifest_root = os.path.commonpath([os.path.realpath(folder) for folder in folders])
        result = split_entries(
            manifest_root, paths, [header_results[path] for path in paths], valid_percent=0.0, seed=0
        )
        report_skipped(
            result.skipped, dest / f"{name}.skipped.tsv", lambda message: print(message, file=sys.stderr)
        )
        if result.skipped and strict:
            raise ValueError(
                f"{name}: {len(result.skipped)} unusable audio file(s), listed in "
                f"{dest / (name + '.skipped.tsv')}"
            )
        manifest_path = dest / f"{name}.tsv"
        write_manifest(manifest_path, result.root, result.train)
        _, ltr_path = write_labels(manifest_path, dest, name)
        letters = ltr_path.read_text(encoding="utf-8").splitlines()
        for entry, line in zip(result.train, letters, strict=True):
            audio_path = os.path.join(result.root, entry.rel_path)
            all_letters[audio_path] = line
            if SPLITS[name].is_train:
                train_letters[audio_path] = line
        outcomes[name] = SplitOutcome(
            name,
            "written",
            files=len(result.train),
            skipped=len(result.skipped),
            hours=sum(entry.num_samples for entry in result.train) / ASSUMED_SAMPLE_RATE / 3600,
            note=f"root {result.root}",
        )

    if located:
        counted = train_letters or all_letters
        dictionary = dictionary_from_counts(count_tokens(counted.values()))
        dictionary.save(dest / "dict.ltr.txt")
        source = "training splits" if train_letters else "evaluation splits (no training split found)"
        print(
            f"dict.ltr.txt: {len(dictionary) - dictionary.nspecial} symbols from {len(counted)} "
            f"utterances of the {source}",
            file=sys.stderr,
        )
    return [outcomes[name] for name in names]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "root",
        metavar="ROOT",
        help="directory holding LibriSpeech folders (directly or in LibriSpeech/) "
        "and/or librispeech_finetuning/",
    )
    parser.add_argument(
        "--dest", required=True, help="output directory for <split>.tsv/.wrd/.ltr, dict.ltr.txt"
    )
    parser.add_argument(
        "--splits",
        nargs="+",
        default=None,
        choices=list(SPLITS),
        metavar="SPLIT",
        help=f"splits to prepare (default: all of {', '.join(SPLITS)})",
    )
    parser.add_argument(
        "--require",
        action="append",
        default=[],
        choices=list(SPLITS),
        metavar="SPLIT",
        help="fail when this split's folders are absent (repeatable)",
    )
    parser.add_argument("--strict", action="store_true", help="unreadable audio is an error")
    parser.add_argument(
        "--workers", type=int, default=None, help="header-reading processes (default: all cores)"
    )


def main(args: argparse.Namespace) -> int:
    try:
        outcomes = prepare(args.root, args.dest, args.splits, args.require, args.strict, args.workers)
    except (FileNotFoundError, ValueError, TranscriptError) as error:
        print(f"prepare-librispeech: {error}", file=sys.stderr)
        return 1
    _print_summary(outcomes)
    if not any(outcome.status == "written" for outcome in outcomes):
        print(f"prepare-librispeech: no split found under {args.root}", file=sys.stderr)
        return 1
    return 0
