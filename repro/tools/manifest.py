"""`python -m repro.tools manifest ROOT --dest DIR`: train/valid `.tsv` manifests.

Same contract as fairseq's `examples/wav2vec/wav2vec_manifest.py` (fairseq_spec.md §4.2):
`train.tsv` (and `valid.tsv` when `--valid-percent > 0`) start with `realpath(ROOT)`; each audio
file becomes `relpath(realpath(file), root)<TAB>frames`, and goes to train when
`random.Random(seed).random() > valid_percent`, one draw per file.

Differences, all deliberate:
* files are visited in sorted path order instead of the filesystem order of `glob.iglob`, so
  the split depends only on the seed and the set of files, not on the filesystem;
* headers are read in parallel (a process pool over chunks of files), with a progress bar;
* a file soundfile cannot read, or that holds 0 frames, is reported (stderr and
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
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import soundfile
from tqdm import tqdm

from repro.data.manifest import ManifestEntry, write_manifest

SKIPPED_FILE_NAME = "skipped.tsv"
# Below this many files (~0.1 s of header reading) starting a process pool costs more than it saves.
MIN_FILES_FOR_POOL = 1000


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
# Reading headers


def _frames_or_error(path: str) -> tuple[int, str | None]:
    try:
        # Opening is what soundfile.info does, minus collecting the fields we do not need.
        with soundfile.SoundFile(path) as sound_file:
            frames = int(sound_file.frames)
    except Exception as error:  # any failure of libsndfile means "unreadable"
        message = " ".join(str(error).split()) or type(error).__name__
        return -1, f"unreadable: {message}"
    if frames <= 0:
        return frames, "holds 0 frames"
    return frames, None


def _read_chunk(paths: Sequence[str]) -> list[tuple[int, str | None]]:
    return [_frames_or_error(path) for path in paths]


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_frames(
    paths: Sequence[str], workers: int | None = None, progress: bool = True, description: str = "headers"
) -> list[tuple[int, str | None]]:
    """(frames, error or None) per path, in input order; parallel over `workers` processes."""
    workers = default_workers() if workers is None else max(1, workers)
    if not paths:
        return []
    bar = tqdm(
        total=len(paths),
        desc=description,
        unit="file",
        file=sys.stderr,
        disable=not progress,
        mininterval=0.5,
    )
    if workers == 1 or len(paths) < MIN_FILES_FOR_POOL:
        results = []
        for path in paths:
            results.append(_frames_or_error(path))
            bar.update(1)
        bar.close()
        return results
    # Several chunks per worker balance the load; a bounded chunk keeps the bar moving.
    chunk_size = max(32, min(2048, len(paths) // (workers * 8) + 1))
    chunks = [paths[start : start + chunk_size] for start in range(0, len(paths), chunk_size)]
    chunk_results: list[list[tuple[int, str | None]]] = [[] for _ in chunks]
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        futures = {pool.submit(_read_chunk, chunk): index for index, chunk in enumerate(chunks)}
        for future in as_completed(futures):
            index = futures[future]
            chunk_results[index] = future.result()
            bar.update(len(chunks[index]))
    bar.close()
    return [result for chunk in chunk_results for result in chunk]


# ------------------------------------------------------------------------------------------------
# Building the manifest


def split_entries(
    root: str,
    paths: Sequence[str],
    frames_and_errors: Sequence[tuple[int, str | None]],
    valid_percent: float,
    seed: int,
) -> ManifestResult:
    """Train/valid entries from header results: one `random.Random(seed).random()` draw per usable file."""
    result = ManifestResult(root=root)
    split_rng = random.Random(seed)
    for path, (frames, error) in zip(paths, frames_and_errors, strict=True):
        if error is not None:
            result.skipped.append(SkippedFile(path=path, error=error))
            continue
        entry = ManifestEntry(rel_path=os.path.relpath(path, root), num_samples=frames)
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
) -> ManifestResult:
    """Entries for every readable `*.ext` file under `root`.

    `valid_percent` is a fraction (0.01 = 1 %), as in fairseq.
    """
    if not 0.0 <= valid_percent <= 1.0:
        raise ValueError(f"--valid-percent must be a fraction in [0, 1], got {valid_percent}")
    root_real = os.path.realpath(root)
    paths = find_audio_files(root_real, ext, path_must_contain)
    frames_and_errors = read_frames(paths, workers=workers, progress=progress)
    return split_entries(root_real, paths, frames_and_errors, valid_percent, seed)


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
        "--strict",
        action="store_true",
        help="unreadable or empty files are an error instead of being left out",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="header-reading processes (default: all available cores)"
    )


def main(args: argparse.Namespace) -> int:
    def to_stderr(message: str) -> None:
        print(message, file=sys.stderr)

    dest = Path(args.dest)
    try:
        result = build_manifest(
            args.root, args.ext, args.valid_percent, args.seed, args.path_must_contain, args.workers
        )
    except (FileNotFoundError, ValueError) as error:
        to_stderr(f"manifest: {error}")
        return 2
    dest.mkdir(parents=True, exist_ok=True)
    report_skipped(result.skipped, dest / SKIPPED_FILE_NAME, to_stderr)
    if result.skipped and args.strict:
        to_stderr(
            f"manifest: --strict: {len(result.skipped)} unusable file(s) under {result.root}; "
            "no manifest written"
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
