"""WAV / FLAC headers parsed from their bytes equal soundfile's; anything else goes to soundfile."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from repro.data.audio_headers import AudioHeader, parse_header, read_header
from repro.tools.manifest import build_manifest

# (container, subtype) pairs the parser must read itself, and rate / channels / frames to write them at
PARSED_FORMATS = [("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "FLOAT"), ("WAV", "DOUBLE"),
                  ("WAVEX", "PCM_16"), ("WAVEX", "FLOAT"), ("FLAC", "PCM_16"), ("FLAC", "PCM_24"),
                  ("FLAC", "PCM_S8")]
SHAPES = [(16_000, 1, 1), (16_000, 1, 1601), (8_000, 2, 777), (44_100, 3, 5000), (22_050, 1, 40_000)]


def write(path: Path, container: str, subtype: str, rate: int, channels: int, frames: int) -> Path:
    samples = np.random.default_rng(frames).uniform(-0.3, 0.3, (frames, channels)).astype(np.float32)
    soundfile.write(path, samples, rate, subtype=subtype, format=container)
    return path


def soundfile_header(path: Path) -> AudioHeader | None:
    """What libsndfile says, or None when it cannot open the file."""
    try:
        with soundfile.SoundFile(str(path)) as sound_file:
            return AudioHeader(sound_file.frames, sound_file.samplerate, sound_file.channels)
    except Exception:
        return None


@pytest.mark.parametrize(("container", "subtype"), PARSED_FORMATS)
def test_parsed_header_equals_soundfile(tmp_path: Path, container: str, subtype: str) -> None:
    suffix = "flac" if container == "FLAC" else "wav"
    for rate, channels, frames in SHAPES:
        path = write(tmp_path / f"{rate}_{channels}_{frames}.{suffix}", container, subtype, rate, channels, frames)
        parsed = parse_header(path)
        assert parsed == soundfile_header(path) == AudioHeader(frames, rate, channels), path
        assert read_header(path) == parsed


def test_unusual_files_go_to_soundfile(tmp_path: Path) -> None:
    # mu-law WAV: an encoding the parser leaves to libsndfile
    ulaw = write(tmp_path / "ulaw.wav", "WAV", "ULAW", 8_000, 1, 900)
    assert parse_header(ulaw) is None and read_header(ulaw) == AudioHeader(900, 8_000, 1)
    # FLAC whose STREAMINFO does not know its length (total_samples = 0, as a streaming encoder writes it)
    flac = write(tmp_path / "known.flac", "FLAC", "PCM_16", 16_000, 1, 3000)
    data = bytearray(flac.read_bytes())
    assert data[:4] == b"fLaC" and int.from_bytes(data[21:26], "big") & (2**36 - 1) == 3000
    data[21] &= 0xF0  # the low 4 bits of byte 21 and bytes 22..25 hold the 36-bit total
    data[22:26] = bytes(4)
    unknown = tmp_path / "unknown.flac"
    unknown.write_bytes(bytes(data))
    assert parse_header(unknown) is None
    # libsndfile reports SF_COUNT_MAX frames for it, which is no length: the file is refused, saying why
    assert soundfile_header(unknown) == AudioHeader(2**63 - 1, 16_000, 1)
    assert str(read_header(unknown)).startswith("length unknown: ")
    # not audio at all
    text = tmp_path / "notes.wav"
    text.write_text("not audio")
    assert parse_header(text) is None and str(read_header(text)).startswith("unreadable: ")


@pytest.mark.parametrize(("container", "subtype", "suffix"), [("WAV", "FLOAT", "wav"), ("FLAC", "PCM_16", "flac")])
def test_truncated_files_agree_with_soundfile(tmp_path: Path, container: str, subtype: str, suffix: str) -> None:
    """Cut at every byte of the header and a few places in the audio: same header or same refusal."""
    whole = write(tmp_path / f"whole.{suffix}", container, subtype, 16_000, 2, 2000).read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    lengths = [*range(0, 160), len(whole) // 2, len(whole) - 3, len(whole) - 1, len(whole)]
    refused = 0
    for length in lengths:
        cut.write_bytes(whole[:length])
        expected = soundfile_header(cut)
        parsed = parse_header(cut)
        assert parsed is None or parsed == expected, length
        result = read_header(cut)
        if expected is None:
            refused += 1
            assert isinstance(result, str) and result.startswith("unreadable: "), length
        else:
            assert result == (expected if expected.frames > 0 else "holds 0 frames"), length
    assert refused > 40  # the cuts inside the header are refused


def test_manifest_names_a_truncated_file(tmp_path: Path) -> None:
    root = tmp_path / "audio"
    root.mkdir()
    write(root / "good.flac", "FLAC", "PCM_16", 16_000, 1, 1600)
    whole = write(tmp_path / "whole.flac", "FLAC", "PCM_16", 16_000, 1, 1600).read_bytes()
    (root / "cut.flac").write_bytes(whole[:30])  # inside STREAMINFO
    result = build_manifest(root, "flac", valid_percent=0.0, progress=False)
    assert [entry.rel_path for entry in result.train] == ["good.flac"]
    assert [item.path for item in result.skipped] == [str(root / "cut.flac")]
    assert result.skipped[0].error.startswith("unreadable: ")
