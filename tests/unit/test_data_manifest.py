"""Manifest format (fairseq wav2vec_manifest.py), split determinism, bad files; audio reading."""

import random
from pathlib import Path

import numpy as np
import pytest
import soundfile

from repro.data.audio import AudioError, read_audio
from repro.data.manifest import ManifestEntry, ManifestError, read_manifest, write_manifest
from repro.tools import __main__ as tools


def write_flac(
    path: Path, num_samples: int, sample_rate: int = 16_000, channels: int = 1, seed: int = 0
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (num_samples,) if channels == 1 else (num_samples, channels)
    soundfile.write(path, rng.uniform(-0.5, 0.5, shape).astype(np.float32), sample_rate)


def make_tree(root: Path, count: int) -> dict[str, int]:
    """`count` FLACs in nested speaker/chapter folders; returns rel_path -> frames."""
    expected = {}
    for i in range(count):
        rel = f"{i % 3}/{i % 2}/utt{i:03d}.flac"
        write_flac(root / rel, 100 + 7 * i, seed=i)
        expected[rel] = 100 + 7 * i
    return expected


def run_manifest(root: Path, dest: Path, *extra: str) -> int:
    return tools.main(["manifest", str(root), "--dest", str(dest), *extra])


def test_manifest_format_and_split_rule(tmp_path: Path) -> None:
    expected = make_tree(tmp_path / "audio", 30)
    (tmp_path / "audio" / "notes.txt").write_text("not audio")
    assert run_manifest(tmp_path / "audio", tmp_path / "out", "--valid-percent", "0.3", "--seed", "7") == 0
    train_lines = (tmp_path / "out" / "train.tsv").read_text().splitlines()
    valid_lines = (tmp_path / "out" / "valid.tsv").read_text().splitlines()
    root = str((tmp_path / "audio").resolve())
    assert train_lines[0] == root and valid_lines[0] == root
    # fairseq's rule over files in sorted order: one draw each, > valid_percent -> train.
    draw = random.Random(7)
    want_train, want_valid = [], []
    for rel in sorted(expected):
        (want_train if draw.random() > 0.3 else want_valid).append(f"{rel}\t{expected[rel]}")
    assert train_lines[1:] == want_train and valid_lines[1:] == want_valid
    assert 0 < len(want_valid) < 30
    assert not (tmp_path / "out" / "skipped.tsv").exists()


def test_same_seed_same_split_different_seed_different(tmp_path: Path) -> None:
    make_tree(tmp_path / "audio", 40)

    def split(seed: int, name: str) -> tuple[str, str]:
        assert (
            run_manifest(tmp_path / "audio", tmp_path / name, "--valid-percent", "0.5", "--seed", str(seed))
            == 0
        )
        return ((tmp_path / name / "train.tsv").read_text(), (tmp_path / name / "valid.tsv").read_text())

    assert split(1, "a") == split(1, "b")
    assert split(1, "a") != split(2, "c")


def test_no_valid_file_when_valid_percent_zero_and_path_filter(tmp_path: Path) -> None:
    expected = make_tree(tmp_path / "audio", 9)
    assert (
        run_manifest(
            tmp_path / "audio", tmp_path / "out", "--valid-percent", "0", "--path-must-contain", "/1/"
        )
        == 0
    )
    lines = (tmp_path / "out" / "train.tsv").read_text().splitlines()[1:]
    assert lines == [f"{rel}\t{n}" for rel, n in sorted(expected.items()) if "/1/" in f"/{rel}"]
    assert not (tmp_path / "out" / "valid.tsv").exists()


def test_bad_files_listed_and_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = make_tree(tmp_path / "audio", 6)
    corrupt = tmp_path / "audio" / "0" / "corrupt.flac"
    corrupt.write_bytes(b"this is not a flac file at all" * 10)
    empty = tmp_path / "audio" / "1" / "empty.flac"
    empty.write_bytes(b"")
    zero_frames = tmp_path / "audio" / "zero.wav"
    soundfile.write(zero_frames, np.zeros(0, dtype=np.float32), 16_000)
    assert run_manifest(tmp_path / "audio", tmp_path / "out", "--valid-percent", "0", "--ext", "flac") == 0
    lines = (tmp_path / "out" / "train.tsv").read_text().splitlines()[1:]
    assert lines == [f"{rel}\t{n}" for rel, n in sorted(expected.items())]
    skipped = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == [str(corrupt.resolve()), str(empty.resolve())]
    assert all(line.split("\t")[1].startswith("unreadable") for line in skipped)
    assert str(corrupt.resolve()) in capsys.readouterr().err
    # A wav with 0 frames opens fine but is useless: listed, left out.
    assert run_manifest(tmp_path / "audio", tmp_path / "wav", "--valid-percent", "0", "--ext", "wav") == 0
    assert (tmp_path / "wav" / "train.tsv").read_text().splitlines()[1:] == []
    assert (tmp_path / "wav" / "skipped.tsv").read_text() == f"{zero_frames.resolve()}\tholds 0 frames\n"
    # --strict: an error naming the files, no manifest written.
    code = run_manifest(tmp_path / "audio", tmp_path / "strict", "--valid-percent", "0", "--strict")
    assert code == 1
    assert "corrupt.flac" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "train.tsv").exists()


def test_other_rates_and_channels_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = make_tree(tmp_path / "audio", 4)
    narrow = tmp_path / "audio" / "narrow.flac"
    write_flac(narrow, 500, sample_rate=8000)
    stereo = tmp_path / "audio" / "stereo.flac"
    write_flac(stereo, 600, channels=2)
    assert run_manifest(tmp_path / "audio", tmp_path / "out", "--valid-percent", "0") == 0
    rows = (tmp_path / "out" / "train.tsv").read_text().splitlines()[1:]
    assert rows == sorted([f"{rel}\t{n}" for rel, n in expected.items()] + ["narrow.flac\t500", "stereo.flac\t600"])
    err = capsys.readouterr().err.splitlines()
    err = err[next(i for i, line in enumerate(err) if line.startswith("1 file(s) are not")):]  # after the bar
    assert err[0] == ("1 file(s) are not at 16000 Hz (8000 Hz): written, but training refuses them (no resampling, "
                      "as fairseq); resample them or pass --sample-rate:")
    assert err[1] == f"  {narrow.resolve()}: 8000 Hz"
    assert err[2].startswith("1 file(s) have more than one channel") and err[3] == f"  {stereo.resolve()}: 2 channels"
    # --sample-rate names the rate the data is meant to have; --strict refuses another rate.
    assert run_manifest(tmp_path / "audio", tmp_path / "8k", "--valid-percent", "0", "--sample-rate", "8000") == 0
    assert "5 file(s) are not at 8000 Hz (16000 Hz)" in capsys.readouterr().err
    assert run_manifest(tmp_path / "audio", tmp_path / "strict", "--valid-percent", "0", "--strict") == 1
    assert "1 at another rate than 16000 Hz" in capsys.readouterr().err
    assert not (tmp_path / "strict" / "train.tsv").exists()


def test_read_manifest_round_trip_and_errors(tmp_path: Path) -> None:
    entries = [ManifestEntry("a/b.flac", 123), ManifestEntry("c.flac", 4)]
    write_manifest(tmp_path / "m.tsv", "/data/root", entries)
    manifest = read_manifest(tmp_path / "m.tsv")
    assert manifest.root == Path("/data/root") and manifest.entries == entries
    (tmp_path / "bad.tsv").write_text("/root\na.flac\t10\nb.flac\tten\n")
    with pytest.raises(ManifestError, match=r"bad\.tsv:3: num_samples 'ten'"):
        read_manifest(tmp_path / "bad.tsv")


def test_read_audio(tmp_path: Path) -> None:
    write_flac(tmp_path / "stereo.flac", 500, channels=2)
    stereo, _ = soundfile.read(tmp_path / "stereo.flac", dtype="float32")
    mono = read_audio(tmp_path / "stereo.flac")
    assert mono.dtype == np.float32 and mono.shape == (500,)
    np.testing.assert_allclose(mono, stereo.mean(axis=1), rtol=0, atol=1e-7)

    write_flac(tmp_path / "8k.flac", 500, sample_rate=8000)
    with pytest.raises(AudioError, match=r"8k\.flac: sample rate 8000 Hz, expected 16000"):
        read_audio(tmp_path / "8k.flac")
    (tmp_path / "empty.flac").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.flac: cannot read audio"):
        read_audio(tmp_path / "empty.flac")
    write_flac(tmp_path / "long.flac", 16_000)
    data = (tmp_path / "long.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])  # header still announces 16000
    with pytest.raises(AudioError, match=r"cut\.flac"):
        read_audio(tmp_path / "cut.flac")
    with pytest.raises(AudioError, match=r"long\.flac: holds 16000 samples but the manifest says 20000"):
        read_audio(tmp_path / "long.flac", expected_num_samples=20_000)


def test_links_are_followed_and_named_by_real_path(tmp_path: Path) -> None:
    write_flac(tmp_path / "outside" / "x.flac", 321)
    write_flac(tmp_path / "other" / "sub" / "y.flac", 123)
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio" / "link.flac").symlink_to(tmp_path / "outside" / "x.flac")
    (tmp_path / "audio" / "linked_dir").symlink_to(tmp_path / "other")
    write_flac(tmp_path / "audio" / ".hidden" / "h.flac", 50)  # glob skips hidden names
    assert run_manifest(tmp_path / "audio", tmp_path / "out", "--valid-percent", "0") == 0
    # fairseq: relpath(realpath(file), realpath(root)).
    assert (tmp_path / "out" / "train.tsv").read_text().splitlines()[1:] == [
        "../outside/x.flac\t321",
        "../other/sub/y.flac\t123",
    ]


def write_flac_of_unknown_length(path: Path, num_samples: int) -> None:
    """A FLAC as written to a stream: STREAMINFO's 36-bit total-samples field left 0 (length unknown)."""
    write_flac(path, num_samples, seed=7)
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0  # STREAMINFO first; its body starts at byte 8
    packed = int.from_bytes(data[18:26], "big")  # rate (20 bits), channels, bits, total samples (36 bits)
    assert packed & ((1 << 36) - 1) == num_samples
    data[18:26] = (packed & ~((1 << 36) - 1)).to_bytes(8, "big")
    path.write_bytes(bytes(data))


def test_flac_of_unknown_length_is_named_and_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    expected = make_tree(tmp_path / "audio", 3)
    streamed = tmp_path / "audio" / "streamed.flac"
    write_flac_of_unknown_length(streamed, 4000)
    with soundfile.SoundFile(streamed) as sound_file:
        assert sound_file.frames == 2**63 - 1  # what soundfile reports, and fairseq would write
    assert run_manifest(tmp_path / "audio", tmp_path / "out", "--valid-percent", "0") == 0
    lines = (tmp_path / "out" / "train.tsv").read_text().splitlines()[1:]
    assert lines == [f"{rel}\t{n}" for rel, n in sorted(expected.items())]  # no 9223372036854775807 row
    skipped = (tmp_path / "out" / "skipped.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in skipped] == [str(streamed.resolve())]
    assert skipped[0].split("\t")[1].startswith("length unknown")
    assert f"{streamed.resolve()}: length unknown" in capsys.readouterr().err
    with pytest.raises(AudioError, match="length unknown"):  # training refuses it with the same reason
        read_audio(streamed)
