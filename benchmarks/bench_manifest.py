"""Manifest tool speed: files/s of `repro.tools manifest` vs the plain sequential approach.

The baseline is what fairseq's wav2vec_manifest.py does: `glob.iglob(root/**/*.flac)` then
`soundfile.info(f).frames` one file at a time. Ours walks the tree and parses WAV/FLAC headers
from their first bytes (soundfile for anything unusual), in a process pool from
`MIN_FILES_FOR_POOL` files. Both run in this process on the same files, after one untimed
warm-up pass (so both see a warm page cache), alternating over `--repeats` rounds; the best
round of each is kept. Two measures: CPU time (this process and its reaped pool workers, from
`os.times`: the headline, as it barely moves when other processes load the machine) and wall time.

    python -m benchmarks.bench_manifest            # 5,000 files
    python -m benchmarks.bench_manifest --quick    # 500 files (smoke run)
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile

from repro.data.audio_headers import MIN_FILES_FOR_POOL, default_workers
from repro.tools.manifest import build_manifest

FILES_PER_CHAPTER = 50
SAMPLES_PER_FILE = 1_600  # 0.1 s at 16 kHz: small files make the per-file overhead dominate


def generate_files(root: Path, count: int, seed: int = 0) -> None:
    """`count` short FLACs in a LibriSpeech-like speaker/chapter tree (written once)."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        chapter_dir = root / str(index // (FILES_PER_CHAPTER * 4)) / str(index // FILES_PER_CHAPTER)
        chapter_dir.mkdir(parents=True, exist_ok=True)
        samples = rng.uniform(-0.3, 0.3, SAMPLES_PER_FILE + index % 97).astype(np.float32)
        soundfile.write(chapter_dir / f"utt-{index:06d}.flac", samples, 16_000)


def baseline_manifest(root: Path) -> list[tuple[str, int]]:
    """glob, then soundfile.info one file at a time (fairseq's wav2vec_manifest.py loop)."""
    root_real = os.path.realpath(root)
    rows = []
    for file_name in glob.iglob(os.path.join(root_real, "**/*.flac"), recursive=True):
        rows.append(
            (os.path.relpath(os.path.realpath(file_name), root_real), soundfile.info(file_name).frames)
        )
    return rows


def ours_manifest(root: Path, workers: int | None) -> list[tuple[str, int]]:
    result = build_manifest(root, "flac", valid_percent=0.0, workers=workers, progress=False)
    return [(entry.rel_path, entry.num_samples) for entry in result.train]


def cpu_seconds() -> float:
    """User + system time of this process and of its reaped children (the pool's workers)."""
    children = os.times()  # clock ticks (10 ms) only: the process's own time comes from process_time
    return time.process_time() + children.children_user + children.children_system


def timed(function) -> tuple[float, float, list[tuple[str, int]]]:
    """(cpu seconds, wall seconds, rows) of one call."""
    started_cpu, started_wall = cpu_seconds(), time.perf_counter()
    rows = function()
    return cpu_seconds() - started_cpu, time.perf_counter() - started_wall, rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 files instead of 5,000")
    parser.add_argument("--files", type=int, default=None, help="number of files (overrides --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method (best is kept)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="reuse/generate the files here instead of a temp dir"
    )
    args = parser.parse_args()
    count = args.files or (500 if args.quick else 5_000)
    repeats = args.repeats or (2 if args.quick else 3)

    with tempfile.TemporaryDirectory(prefix="bench_manifest_") as temporary:
        root = args.dir or Path(temporary)
        existing = len(list(root.rglob("*.flac"))) if root.exists() else 0
        if existing != count:
            started = time.perf_counter()
            generate_files(root, count)
            print(f"generated {count} files in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        workers = default_workers()
        ours_manifest(root, workers)  # warm-up: page cache, imports
        contenders = {
            "baseline": lambda: baseline_manifest(root),
            "ours": lambda: ours_manifest(root, workers),
            "ours_1": lambda: ours_manifest(root, 1),
        }
        best = {name: [float("inf"), float("inf")] for name in contenders}
        rows = {}
        for round_index in range(repeats):
            names = list(contenders) if round_index % 2 == 0 else list(reversed(contenders))
            for name in names:  # alternate, so that a burst of load on the machine hits all of them
                cpu, wall, rows[name] = timed(contenders[name])
                best[name] = [min(best[name][0], cpu), min(best[name][1], wall)]
        if sorted(rows["baseline"]) != sorted(rows["ours"]) or sorted(rows["ours"]) != sorted(rows["ours_1"]):
            print("error: our manifest rows differ from the baseline's", file=sys.stderr)
            return 1

    def line(label: str, name: str) -> str:
        cpu, wall = best[name]
        return f"{label:46s} {count / cpu:8.0f} files/cpu-s {count / wall:8.0f} files/s"

    pool = "pool" if count >= MIN_FILES_FOR_POOL else f"sequential below {MIN_FILES_FOR_POOL} files"
    print(f"files: {count}, cores: {workers}, best of {repeats} alternating rounds, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(line("baseline (glob + soundfile.info, sequential):", "baseline"))
    print(line("ours, 1 worker:", "ours_1"))
    print(line(f"ours, {workers} workers ({pool}):", "ours"))
    print(f"ratio ours/baseline: cpu time {best['baseline'][0] / best['ours'][0]:.2f}x  "
          f"wall time {best['baseline'][1] / best['ours'][1]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
