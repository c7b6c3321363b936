"""`python -m repro.tools manifest ROOT --dest DIR`: train/valid `.tsv` manifests.

Same contract as fairseq's `examples/wav2vec/wav2vec_manifest.py` (fairseq_spec.md §4.2):
`train.tsv` (and `valid.tsv` when `--valid-percent > 0`) start with `realpath(ROOT)`; each audio
file becomes `relpath(realpath(file), root)<TAB>frames`, and goes to train when
`random.Random(seed).random() > valid_percent`, one draw per file.

Differences, all deliberate:
* files are visited in sorted path order instead of the filesystem order of `glob.iglob`, so
  the split depends only on the seed and the set of files, not on the filesystem;
* headers are read in parallel (a process pool over chunks of files), with a progress bar;
* files at another sample rate than `--sample-rate` (16 kHz) or with several channels are written
  (fairseq writes them) and reported: training refuses the first and averages the second to mono;
* a file soundfile cannot read, that holds 0 frames, or whose length is unknown (a FLAC written to a
  stream: its header has no total-sample count, soundfile reports 2**63-1 frames, which fairseq writes
  as the length; libsndfile cannot decode such a file to its end either, so it is not measured by
  decoding but named with how to re-encode it) is reported (stderr and
  `skipped.tsv`: `path<TAB>error`) and left out, where fairseq would crash; it takes no random
  draw, so the manifests equal fairseq's on the tree without the bad files. `--strict` turns
  any such file into an error (exit 1, no manifest written).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from repro.data.audio_headers import AudioHeader, HeaderResult, read_headers
from repro.data.manifest import ManifestEntry, write_manifest

SKIPPED_FILE_NAME = "skipped.tsv"
MAX_LISTED_FILES = 10
"""Files named one per line in the sample-rate and channel reports; the rest are counted."""


@dataclass
class SkippedFile:
    path: str
    """Absolute (real) path of the file."""
    error: str
    """Why it was left out."""


@dataclass
class ManifestResult:
    root: str
    """realpath(ROOT): first line of the manifests."""
    train: list[ManifestEntry] = field(default_factory=list)
    valid: list[ManifestEntry] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    other_rate: list[tuple[str, int]] = field(default_factory=list)
    """(path, sample rate) of written files at another rate than expected: training refuses them."""
    multichannel: list[tuple[str, int]] = field(default_factory=list)
    """(path, channels) of written files with more than one channel (averaged to mono when read)."""


# ------------------------------------------------------------------------------------------------
# Finding files


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _scan(directory: str, real_directory: str, suffix: str, found: list[tuple[str, str]]) -> None:
    """Append (path as glob would name it, real path) of matching files, recursing into subfolders."""
    with os.scandir(directory) as entries:
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            if entry.is_dir():  # follows links to folders, like glob's `**`
                real_subdirectory = (
                    os.path.realpath(entry.path)
                    if entry.is_symlink()
                    else os.path.join(real_directory, entry.name)
                )
                _scan(entry.path, real_subdirectory, suffix, found)
            elif entry.name.endswith(suffix) and entry.is_file():
                # realpath only for links: it costs a syscall per path component.
                real_path = (
                    os.path.realpath(entry.path)
                    if entry.is_symlink()
                    else os.path.join(real_directory, entry.name)
                )
                found.append((entry.path, real_path))


def find_audio_files(root: str | Path, ext: str, path_must_contain: str | None = None) -> list[str]:
    """Sorted real paths of `root/**/*.ext` (glob semantics: hidden names skipped, links followed).

    Sorted by the path under `root` (what glob would yield), so the order - and hence the
    train/valid split - is the same on every filesystem.
    """
    root = os.path.realpath(root)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: not a directory")
    found: list[tuple[str, str]] = []
    _scan(root, root, "." + ext.lstrip("."), found)
    found.sort()
    real_paths = [real_path for _, real_path in found]
    if path_must_contain:
        # fairseq tests the real path of the file.
        real_paths = [path for path in real_paths if path_must_contain in path]
    return real_paths


# ------------------------------------------------------------------------------------------------
# Building the manifest


def split_entries(
    root: str,
    paths: Sequence[str],
    headers: Sequence[HeaderResult],
    valid_percent: float,
    seed: int,
    sample_rate: int | None = 16_000,
) -> ManifestResult:
    """Train/valid entries from header results: one `random.Random(seed).random()` draw per usable file.

    Files at a rate other than `sample_rate` (None: any) or with several channels are still written,
    as fairseq writes them, and listed in the result so that the tool can say so.
    """
    result = ManifestResult(root=root)
    split_rng = random.Random(seed)
    for path, header in zip(paths, headers, strict=True):
        if not isinstance(header, AudioHeader):
            result.skipped.append(SkippedFile(path=path, error=header))
            continue
        if sample_rate is not None and header.sample_rate != sample_rate:
            result.other_rate.append((path, header.sample_rate))
        if header.channels > 1:
            result.multichannel.append((path, header.channels))
        entry = ManifestEntry(rel_path=os.path.relpath(path, root), num_samples=header.frames)
        (result.train if split_rng.random() > valid_percent else result.valid).append(entry)
    return result


def build_manifest(
    root: str | Path,
    ext: str = "flac",
    valid_percent: float = 0.01,
    seed: int = 42,
    path_must_contain: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    sample_rate: int | None = 16_000,
) -> ManifestResult:
    """Entries for every readable `*.ext` file under `root`.

    `valid_percent` is a fraction (0.01 = 1 %), as in fairseq; files at another rate than
    `sample_rate` are written and listed in `other_rate`.
    """
    if not 0.0 <= valid_percent <= 1.0:
        raise ValueError(f"--valid-percent must be a fraction in [0, 1], got {valid_percent}")
    root_real = os.path.realpath(root)
    paths = find_audio_files(root_real, ext, path_must_contain)
    headers = read_headers(paths, workers=workers, progress=progress)
    return split_entries(root_real, paths, headers, valid_percent, seed, sample_rate)


def report_skipped(
    skipped: Sequence[SkippedFile], skipped_path: Path, write: Callable[[str], object]
) -> None:
    """Print the skipped files and write them to `skipped_path` (removing a stale one when none)."""
    if not skipped:
        if skipped_path.exists():
            skipped_path.unlink()
        return
    skipped_path.write_text("".join(f"{item.path}\t{item.error}\n" for item in skipped), encoding="utf-8")
    write(f"{len(skipped)} file(s) left out (listed in {skipped_path}):")
    for item in skipped:
        write(f"  {item.path}: {item.error}")


def report_formats(result: ManifestResult, sample_rate: int | None, write: Callable[[str], object]) -> None:
    """Say which written files training will refuse (another rate) or average to mono (several channels)."""
    def listed(items: Sequence[tuple[str, int]], unit: str) -> None:
        for path, value in items[:MAX_LISTED_FILES]:
            write(f"  {path}: {value} {unit}")
        if len(items) > MAX_LISTED_FILES:
            write(f"  ... and {len(items) - MAX_LISTED_FILES} more")

    if result.other_rate:
        rates = sorted({rate for _, rate in result.other_rate})
        write(f"{len(result.other_rate)} file(s) are not at {sample_rate} Hz ({', '.join(map(str, rates))} Hz): "
              "written, but training refuses them (no resampling, as fairseq); resample them or pass --sample-rate:")
        listed(result.other_rate, "Hz")
    if result.multichannel:
        write(f"{len(result.multichannel)} file(s) have more than one channel: written; reading averages the "
              "channels to mono, as fairseq does:")
        listed(result.multichannel, "channels")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", metavar="ROOT", help="directory searched recursively for audio files")
    parser.add_argument("--dest", default=".", help="output directory for train.tsv / valid.tsv")
    parser.add_argument("--ext", default="flac", metavar="EXT", help="audio file extension to look for")
    parser.add_argument(
        "--valid-percent", type=float, default=0.01, help="fraction of files (0..1) that go to valid.tsv"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the train/valid draw")
    parser.add_argument(
        "--path-must-contain", default=None, metavar="S", help="keep only files whose real path contains S"
    )
    parser.add_argument(
        "--sample-rate", type=int, default=16_000,
        help="rate the models take (Hz); files at another rate are reported (0: do not check)",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="unreadable or empty files, and files at another rate, are an error instead of a report",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="header-reading processes (default: all available cores)"
    )


def main(args: argparse.Namespace) -> int:
    def to_stderr(message: str) -> None:
        print(message, file=sys.stderr)

    dest = Path(args.dest)
    sample_rate = args.sample_rate or None
    try:
        result = build_manifest(
            args.root, args.ext, args.valid_percent, args.seed, args.path_must_contain, args.workers,
            sample_rate=sample_rate,
        )
    except (FileNotFoundError, ValueError) as error:
        to_stderr(f"manifest: {error}")
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    report_skipped(result.skipped, dest / SKIPPED_FILE_NAME, to_stderr)
    report_formats(result, sample_rate, to_stderr)
    if (result.skipped or result.other_rate) and args.strict:
        to_stderr(
            f"manifest: --strict: {len(result.skipped)} unusable file(s) and {len(result.other_rate)} at another "
            f"rate than {sample_rate} Hz under {result.root}; no manifest written"
        )
        return 1
    write_manifest(dest / "train.tsv", result.root, result.train)
    if args.valid_percent > 0:
        write_manifest(dest / "valid.tsv", result.root, result.valid)
    to_stderr(
        f"manifest: {len(result.train)} train, {len(result.valid)} valid, "
        f"{len(result.skipped)} skipped -> {dest}"
    )
    return 0
