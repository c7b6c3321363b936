"""Every audio file of a split is checked (headers only, cached) before training reads a batch."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile

from repro.data import audio_headers
from repro.data.audio import AudioError
from repro.data.audio_headers import AudioCheckError, AudioHeader, check_split_audio, read_headers
from repro.data.dataset import FileAudioDataset
from repro.data.manifest import ManifestEntry, write_manifest


def write_wav(path: Path, num_samples: int, sample_rate: int = 16_000, channels: int = 1) -> None:
    rng = np.random.default_rng(num_samples)
    shape = (num_samples,) if channels == 1 else (num_samples, channels)
    soundfile.write(path, rng.uniform(-0.5, 0.5, shape).astype(np.float32), sample_rate)


def make_split(root: Path, sizes: list[int]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for index, size in enumerate(sizes):
        write_wav(root / f"{index}.wav", size)
    write_manifest(root / "train.tsv", root, [ManifestEntry(f"{i}.wav", size) for i, size in enumerate(sizes)])
    return root / "train.tsv"


def test_bad_files_are_named_by_manifest_line_before_any_batch(tmp_path: Path) -> None:
    manifest = make_split(tmp_path / "audio", [1000, 1100, 1200, 1300, 1400, 1500])
    root = tmp_path / "audio"
    write_wav(root / "1.wav", 1100, sample_rate=8000)  # another rate
    write_wav(root / "2.wav", 600)  # replaced by a shorter file
    (root / "3.wav").unlink()  # gone
    (root / "4.wav").write_bytes(b"RIFF garbage")  # unreadable
    write_wav(root / "5.wav", 1500, channels=2)  # stereo: fine, averaged when read
    dataset = FileAudioDataset(manifest)
    with pytest.raises(AudioCheckError) as refused:
        check_split_audio(dataset, progress=False, cache_dir=tmp_path / "cache")
    lines = str(refused.value).splitlines()
    assert lines[0] == f"{manifest}: 4 of 6 audio files cannot be used (found before training by reading their headers):"
    assert lines[1] == f"  {manifest}:3: {root / '1.wav'}: sample rate 8000 Hz, expected 16000 Hz (no resampling)"
    assert lines[2] == f"  {manifest}:4: {root / '2.wav'}: header announces 600 samples but the manifest says 1200"
    assert lines[3].startswith(f"  {manifest}:5: {root / '3.wav'}: cannot open: No such file")
    assert lines[4].startswith(f"  {manifest}:6: {root / '4.wav'}: unreadable: ")
    assert len(lines) == 5 and isinstance(refused.value, AudioError)
    # Rows dropped by min_sample_size are not read, so not checked.
    assert check_split_audio(FileAudioDataset(manifest, min_sample_size=1450), progress=False,
                             cache_dir=tmp_path / "cache") == 1


def test_headers_are_cached_by_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    manifest = make_split(tmp_path / "audio", [1000, 1100, 1200])
    write_wav(tmp_path / "audio" / "2.wav", 1200, channels=2)
    dataset = FileAudioDataset(manifest)
    read: list[str] = []
    real_read_headers = audio_headers.read_headers

    def counting(paths, **kwargs):
        read.extend(Path(path).name for path in paths)
        return real_read_headers(paths, **kwargs)

    monkeypatch.setattr(audio_headers, "read_headers", counting)
    cache = tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="repro.data.audio_headers"):
        assert check_split_audio(dataset, progress=False, cache_dir=cache) == 3
    assert read == ["0.wav", "1.wav", "2.wav"]
    assert f"audio check: {manifest}: 3 files at 16000 Hz as the manifest says (3 read, 0 from the cache; " \
           "1 multi-channel, averaged to mono)" in caplog.text
    assert check_split_audio(dataset, progress=False, cache_dir=cache) == 3
    assert read == ["0.wav", "1.wav", "2.wav"]  # nothing read again
    # A file replaced in place (same name, new size and mtime) is read again and its new header checked.
    write_wav(tmp_path / "audio" / "1.wav", 900)
    os.utime(tmp_path / "audio" / "1.wav", ns=(1, 1))
    with pytest.raises(AudioCheckError, match=r"train\.tsv:3: .*1\.wav: header announces 900 samples"):
        check_split_audio(dataset, progress=False, cache_dir=cache)
    assert read[3:] == ["1.wav"]


def test_parallel_header_reading_matches_sequential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = []
    for index in range(24):
        write_wav(tmp_path / f"{index}.wav", 100 + index, sample_rate=8000 + 1000 * (index % 3), channels=1 + index % 2)
        paths.append(str(tmp_path / f"{index}.wav"))
    (tmp_path / "bad.wav").write_bytes(b"junk")
    paths.append(str(tmp_path / "bad.wav"))
    sequential = read_headers(paths, workers=1, progress=False)
    monkeypatch.setattr(audio_headers, "MIN_FILES_FOR_POOL", 0)
    parallel = read_headers(paths, workers=2, progress=False)
    assert parallel == sequential
    assert parallel[5] == AudioHeader(frames=105, sample_rate=10_000, channels=2)
    assert isinstance(parallel[-1], str) and parallel[-1].startswith("unreadable")


def test_audio_error_while_training_names_the_manifest_line(tmp_path: Path) -> None:
    manifest = make_split(tmp_path / "audio", [1000, 1100])
    dataset = FileAudioDataset(manifest)
    (tmp_path / "audio" / "1.wav").write_bytes(b"garbage")
    with pytest.raises(AudioError, match=rf"1\.wav: cannot read audio: .* \(manifest row {manifest}:3\)"):
        dataset[1]
