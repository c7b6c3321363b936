"""Audio file headers, read in parallel: for the manifest tool and for checking a split before training.

A bad file (unreadable, another sample rate, replaced by a shorter one) otherwise surfaces when its
batch is first read, possibly hours into a run. `check_split_audio` opens the header of every file a
dataset will read (no decoding) and compares it with what the dataset expects: the configured sample
rate (fairseq does not resample) and the manifest's frame count. Multi-channel files are accepted
(averaged to mono when read, as fairseq does) and counted. Headers are cached per file under the
user's cache directory, keyed by (size, mtime), so a second run over the same data only stats files.

Headers of plain WAV and FLAC files are parsed from their first bytes (one `os.pread`), ~10x cheaper
than opening them with libsndfile; anything unusual (other formats, compressed WAV encodings, a FLAC
of unknown length, chunks that do not add up to the file size) goes to soundfile, so every result
equals soundfile's (tests compare both on files of several rates, channel counts, lengths and cuts).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import soundfile
from tqdm import tqdm

from repro.data.audio import UNKNOWN_LENGTH, UNKNOWN_LENGTH_FRAMES, AudioError

if TYPE_CHECKING:
    from repro.data.dataset import FileAudioDataset

log = logging.getLogger(__name__)

MIN_FILES_FOR_POOL = 50_000
"""Below this many files (~1 s of header parsing) starting a process pool costs more than it saves
(measured: at 20,000 cached FLACs on a loaded 2-core machine, 2 processes took longer than 1)."""
MIN_FILES_FOR_PROGRESS = 1000
"""From this many files to read, a progress bar is shown."""
MAX_LISTED_PROBLEMS = 20
"""Unusable files named one per line in the error; the rest are counted."""
CACHE_VERSION = 1


@dataclass(frozen=True)
class AudioHeader:
    frames: int
    """Samples per channel the header announces."""
    sample_rate: int
    """Samples per second."""
    channels: int
    """Interleaved channels (averaged to mono when read)."""


HeaderResult = AudioHeader | str
"""A header, or why the file cannot be used."""


class AudioCheckError(AudioError):
    """Files of a split that training could not read; the message names the manifest and each line."""


def read_header(path: str | Path) -> HeaderResult:
    """The header of `path`, or a one-line reason it is unusable (unreadable, 0 frames, length unknown)."""
    header = parse_header(path)
    if header is None:
        try:
            with soundfile.SoundFile(str(path)) as sound_file:
                header = AudioHeader(int(sound_file.frames), int(sound_file.samplerate), int(sound_file.channels))
        except Exception as error:  # any failure of libsndfile means "unreadable"
            message = " ".join(str(error).split()) or type(error).__name__
            return f"unreadable: {message}"
    if header.frames >= UNKNOWN_LENGTH_FRAMES:  # not a length: fairseq would write 2**63-1 into the manifest
        return UNKNOWN_LENGTH
    return header if header.frames > 0 else "holds 0 frames"


# ------------------------------------------------------------------------------------------------
# Parsing WAV and FLAC headers without libsndfile. Each parser returns None for anything it does not
# fully vouch for; soundfile then decides (and names the error).

HEAD_BYTES = 4096
"""Bytes read at the start of a file: the whole header of nearly every WAV and FLAC."""
MAX_CHANNELS = 1024
"""libsndfile's SF_MAX_CHANNELS: more is an error there."""
WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
WAVE_SAMPLE_BITS = {WAVE_FORMAT_PCM: (8, 16, 24, 32), WAVE_FORMAT_IEEE_FLOAT: (32, 64)}
KSDATAFORMAT_GUID_TAIL = bytes.fromhex("000000001000800000aa00389b71")
"""Bytes 2..15 of the KSDATAFORMAT_SUBTYPE_{PCM,IEEE_FLOAT} GUIDs (the first two hold the format tag)."""
FLAC_SAMPLE_BITS = (8, 16, 24)
"""FLAC sample widths libsndfile reads."""
FLAC_STREAMINFO, FLAC_INVALID_BLOCK = 0, 127


def parse_header(path: str | Path) -> AudioHeader | None:
    """Frames, rate and channels from the bytes of a plain WAV or FLAC file; None: ask soundfile."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # soundfile gives the error
    try:
        size = os.fstat(descriptor).st_size
        head = os.pread(descriptor, HEAD_BYTES, 0)
        if head[:4] == b"fLaC":
            return _flac_header(descriptor, head, size)
        if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
            return _wav_header(descriptor, head, size)
        return None
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _bytes_at(descriptor: int, head: bytes, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` (fewer at the end of the file), from `head` when it holds them."""
    if offset + length <= len(head):
        return head[offset : offset + length]
    return os.pread(descriptor, length, offset)


def _wav_format(body: bytes) -> tuple[int, int, int] | None:
    """(channels, sample rate, bytes per frame) of a `fmt ` chunk of PCM or float samples."""
    if len(body) < 16:
        return None
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", body)
    if tag == WAVE_FORMAT_EXTENSIBLE:
        # cbSize >= 22, then valid bits, channel mask and the subformat GUID whose first 2 bytes are the tag
        if len(body) < 40 or struct.unpack_from("<H", body, 16)[0] < 22 or body[26:40] != KSDATAFORMAT_GUID_TAIL:
            return None
        tag = struct.unpack_from("<H", body, 24)[0]
    if bits not in WAVE_SAMPLE_BITS.get(tag, ()) or not 0 < channels <= MAX_CHANNELS or rate <= 0:
        return None
    if block_align != channels * bits // 8:
        return None
    return channels, rate, block_align


def _wav_header(descriptor: int, head: bytes, size: int) -> AudioHeader | None:
    """RIFF chunks up to `data`; only a whole number of frames filling the file up to its end is vouched for."""
    offset, wav_format = 12, None
    while offset + 8 <= size:
        chunk = _bytes_at(descriptor, head, offset, 8)
        chunk_id, chunk_size = chunk[:4], struct.unpack_from("<I", chunk, 4)[0]
        body = offset + 8
        if chunk_id == b"fmt ":
            if wav_format is not None:
                return None
            wav_format = _wav_format(_bytes_at(descriptor, head, body, min(chunk_size, 40)))
            if wav_format is None:
                return None
        elif chunk_id == b"data":
            if wav_format is None:
                return None
            channels, rate, frame_bytes = wav_format
            # libsndfile clamps a data size beyond the file, and repairs unfinished files: leave those to it
            end = body + chunk_size + (chunk_size & 1)  # with the pad byte of an odd size
            if chunk_size == 0 or chunk_size % frame_bytes or end != size:
                return None
            return AudioHeader(chunk_size // frame_bytes, rate, channels)
        offset = body + chunk_size + (chunk_size & 1)  # chunks are padded to an even size
    return None


def _flac_header(descriptor: int, head: bytes, size: int) -> AudioHeader | None:
    """STREAMINFO (the first metadata block), once every metadata block lies inside the file and a frame follows."""
    if len(head) < 42 or head[4] & 0x7F != FLAC_STREAMINFO or int.from_bytes(head[5:8], "big") != 34:
        return None
    # STREAMINFO body: min/max block size (16 bits each), min/max frame size (24 each), then 64 bits:
    # sample rate (20), channels - 1 (3), bits per sample - 1 (5), total samples (36), then the MD5.
    min_block, max_block = struct.unpack_from(">HH", head, 8)
    packed = int.from_bytes(head[18:26], "big")
    rate, channels = packed >> 44, ((packed >> 41) & 0x7) + 1
    bits, total_samples = ((packed >> 36) & 0x1F) + 1, packed & ((1 << 36) - 1)
    if rate == 0 or total_samples == 0 or bits not in FLAC_SAMPLE_BITS or not 16 <= min_block <= max_block:
        return None  # total_samples 0: length unknown, libsndfile decides
    offset, last = 42, bool(head[4] & 0x80)
    while not last:  # libFLAC reads every metadata block before the audio
        block = _bytes_at(descriptor, head, offset, 4)
        if len(block) < 4 or block[0] & 0x7F in (FLAC_STREAMINFO, FLAC_INVALID_BLOCK):
            return None
        last = bool(block[0] & 0x80)
        offset += 4 + int.from_bytes(block[1:4], "big")
        if offset > size:
            return None
    sync = _bytes_at(descriptor, head, offset, 2)  # a frame header starts with the 14-bit code 0x3FFE
    if len(sync) < 2 or sync[0] != 0xFF or sync[1] & 0xFE != 0xF8:
        return None
    return AudioHeader(total_samples, rate, channels)


def _read_chunk(paths: Sequence[str]) -> list[HeaderResult]:
    return [read_header(path) for path in paths]


def default_workers() -> int:
    """CPUs this process may run on (SLURM's allocation, taskset), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def read_headers(
    paths: Sequence[str], workers: int | None = None, progress: bool = True, description: str = "headers"
) -> list[HeaderResult]:
    """`read_header` of every path, in input order; parallel over `workers` processes."""
    workers = default_workers() if workers is None else max(1, workers)
    if not paths:
        return []
    bar = tqdm(total=len(paths), desc=description, unit="file", file=sys.stderr, disable=not progress,
               mininterval=0.5)
    if workers == 1 or len(paths) < MIN_FILES_FOR_POOL:
        results = []
        for path in paths:
            results.append(read_header(path))
            bar.update(1)
        bar.close()
        return results
    # Several chunks per worker balance the load; a bounded chunk keeps the bar moving.
    chunk_size = max(32, min(2048, len(paths) // (workers * 8) + 1))
    chunks = [paths[start : start + chunk_size] for start in range(0, len(paths), chunk_size)]
    chunk_results: list[list[HeaderResult]] = [[] for _ in chunks]
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        futures = {pool.submit(_read_chunk, chunk): index for index, chunk in enumerate(chunks)}
        for future in as_completed(futures):
            index = futures[future]
            chunk_results[index] = future.result()
            bar.update(len(chunks[index]))
    bar.close()
    return [result for chunk in chunk_results for result in chunk]


# ------------------------------------------------------------------------------------------------
# Cache: one JSON file per manifest, {rel_path: [size, mtime_ns, frames, sample_rate, channels]}


def default_cache_dir() -> Path:
    """`$REPRO_CACHE_DIR`, else `$XDG_CACHE_HOME/repro`, else `~/.cache/repro`."""
    if os.environ.get("REPRO_CACHE_DIR"):
        return Path(os.environ["REPRO_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "repro"


def cache_file(cache_dir: Path, manifest_path: Path, root: Path) -> Path:
    key = hashlib.sha256(f"{manifest_path.resolve()}\n{root}".encode()).hexdigest()[:20]
    return cache_dir / "audio_headers" / f"{key}.json"


def load_cache(path: Path) -> dict[str, list[int]]:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(stored, dict) or stored.get("version") != CACHE_VERSION:
        return {}
    files = stored.get("files")
    return files if isinstance(files, dict) else {}


def save_cache(path: Path, files: dict[str, list[int]]) -> None:
    """Atomic (temp file + rename), so ranks or runs writing at once leave one whole file; best effort."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps({"version": CACHE_VERSION, "files": files}), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as error:
        log.debug("audio header cache %s not written: %s", path, error)
        temporary.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------
# Checking a split


def header_problem(result: HeaderResult, expected_frames: int, expected_rate: int) -> str | None:
    """Why a file with this header cannot be read as the manifest row it belongs to, or None."""
    if isinstance(result, str):
        return result
    if result.sample_rate != expected_rate:
        return f"sample rate {result.sample_rate} Hz, expected {expected_rate} Hz (no resampling)"
    if result.frames != expected_frames:
        return f"header announces {result.frames} samples but the manifest says {expected_frames}"
    return None


def check_split_audio(
    dataset: FileAudioDataset,
    workers: int | None = None,
    progress: bool = True,
    cache_dir: Path | None = None,
) -> int:
    """Check the header of every file `dataset` reads; `AudioCheckError` naming each bad manifest line.

    Returns how many files were checked. Headers come from the cache when a file's size and mtime
    are unchanged; the rest are read (in parallel from `MIN_FILES_FOR_POOL` files, a progress bar from
    `MIN_FILES_FOR_PROGRESS`).
    """
    started = time.monotonic()
    manifest = dataset.manifest_path
    store = cache_file(cache_dir or default_cache_dir(), manifest, dataset.root)
    cached = load_cache(store)
    results: list[HeaderResult | None] = [None] * len(dataset)
    stats: list[list[int] | None] = [None] * len(dataset)
    to_read: list[int] = []
    for index, rel_path in enumerate(dataset.rel_paths):
        try:
            stat = os.stat(dataset.audio_path(index))
        except OSError as error:
            results[index] = f"cannot open: {error.strerror or error}"
            continue
        stats[index] = [stat.st_size, stat.st_mtime_ns]
        entry = cached.get(rel_path)
        if isinstance(entry, list) and len(entry) == 5 and entry[:2] == stats[index]:
            results[index] = AudioHeader(*entry[2:])
        else:
            to_read.append(index)
    fresh = read_headers([str(dataset.audio_path(index)) for index in to_read], workers=workers,
                         progress=progress and len(to_read) >= MIN_FILES_FOR_PROGRESS,
                         description=f"audio headers of {manifest.name}")
    for index, result in zip(to_read, fresh, strict=True):
        results[index] = result

    problems = []
    for index, result in enumerate(results):
        assert result is not None
        problem = header_problem(result, int(dataset.sizes[index]), dataset.sample_rate)
        if problem is not None:
            line = dataset.manifest_line_numbers[index]
            problems.append(f"{manifest}:{line}: {dataset.audio_path(index)}: {problem}")
    if to_read:
        files = dict(cached)
        for index in to_read:
            result, stat = results[index], stats[index]
            if isinstance(result, AudioHeader) and stat is not None:
                files[dataset.rel_paths[index]] = [*stat, result.frames, result.sample_rate, result.channels]
        save_cache(store, files)
    if problems:
        listed = "\n  ".join(problems[:MAX_LISTED_PROBLEMS])
        unlisted = len(problems) - MAX_LISTED_PROBLEMS
        more = f"\n  ... and {unlisted} more" if unlisted > 0 else ""
        raise AudioCheckError(
            manifest, f"{len(problems)} of {len(dataset)} audio files cannot be used (found before training by "
            f"reading their headers):\n  {listed}{more}"
        )
    multichannel = sum(isinstance(result, AudioHeader) and result.channels > 1 for result in results)
    log.info(
        "audio check: %s: %d files at %d Hz as the manifest says (%d read, %d from the cache%s) in %.1f s",
        manifest, len(dataset), dataset.sample_rate, len(to_read), len(dataset) - len(to_read),
        f"; {multichannel} multi-channel, averaged to mono" if multichannel else "", time.monotonic() - started,
    )
    return len(dataset)
