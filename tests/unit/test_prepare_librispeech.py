"""prepare-librispeech on a tiny fake LibriSpeech + Libri-light tree."""

from pathlib import Path

import numpy as np
import pytest
import soundfile

from repro.data.manifest import read_manifest
from repro.tools import __main__ as tools

WORDS = ["HELLO", "WORLD", "SPEECH", "TEST", "DATA", "AUDIO"]


def make_chapter(folder: Path, speaker: int, chapter: int, count: int = 2) -> list[str]:
    """`count` short FLACs + trans.txt; returns the utterance ids."""
    directory = folder / str(speaker) / str(chapter)
    directory.mkdir(parents=True)
    ids, lines = [], []
    for utterance in range(count):
        utterance_id = f"{speaker}-{chapter}-{utterance:04d}"
        samples = 1600 + 37 * utterance + speaker
        soundfile.write(directory / f"{utterance_id}.flac", np.zeros(samples, np.float32), 16_000)
        text = " ".join(WORDS[(speaker + utterance + k) % len(WORDS)] for k in range(2))
        lines.append(f"{utterance_id} {text}\n")
        ids.append(utterance_id)
    (directory / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return ids


def make_fake_corpus(root: Path) -> dict[str, list[str]]:
    """Folder -> utterance ids. LibriSpeech under LibriSpeech/, Libri-light beside it."""
    ids: dict[str, list[str]] = {}
    speaker = 100
    folders = ["train-clean-100", "dev-clean", "dev-other", "test-clean"]  # no test-other, no 360/500
    folders += [f"librispeech_finetuning/1h/{p}/{k}" for p in range(6) for k in ("clean", "other")]
    folders += [f"librispeech_finetuning/9h/{k}" for k in ("clean", "other")]
    for folder in folders:
        base = root / "LibriSpeech" / folder if not folder.startswith("librispeech_") else root / folder
        ids[folder] = make_chapter(base, speaker, 1)
        speaker += 1
    return ids


def manifest_ids(path: Path) -> list[str]:
    return [Path(entry.rel_path).name.split(".")[0] for entry in read_manifest(path).entries]


def test_prepare_split_composition(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ids = make_fake_corpus(tmp_path / "corpus")
    dest = tmp_path / "manifests"
    assert (
        tools.main(["prepare-librispeech", str(tmp_path / "corpus"), "--dest", str(dest), "--workers", "1"])
        == 0
    )

    def folder_ids(*folders: str) -> list[str]:
        return sorted(i for folder in folders for i in ids[folder])

    one_hour = [f"librispeech_finetuning/1h/{p}/{k}" for p in range(6) for k in ("clean", "other")]
    ten_min = folder_ids(*one_hour[:2])
    one_h = folder_ids(*one_hour)
    ten_h = folder_ids(*one_hour, "librispeech_finetuning/9h/clean", "librispeech_finetuning/9h/other")
    assert sorted(manifest_ids(dest / "train_10m.tsv")) == ten_min
    assert sorted(manifest_ids(dest / "train_1h.tsv")) == one_h
    assert sorted(manifest_ids(dest / "train_10h.tsv")) == ten_h
    assert set(ten_min) < set(one_h) < set(ten_h) and (len(ten_min), len(one_h), len(ten_h)) == (4, 24, 28)
    assert (
        read_manifest(dest / "train_10m.tsv").root
        == (tmp_path / "corpus/librispeech_finetuning/1h/0").resolve()
    )
    assert (
        read_manifest(dest / "train_10h.tsv").root == (tmp_path / "corpus/librispeech_finetuning").resolve()
    )
    assert manifest_ids(dest / "dev_clean.tsv") == ids["dev-clean"]
    assert read_manifest(dest / "dev_clean.tsv").root == (tmp_path / "corpus/LibriSpeech/dev-clean").resolve()
    # Labels line up with the manifest rows.
    wrd = (dest / "dev_clean.wrd").read_text().splitlines()
    assert wrd == ["AUDIO HELLO", "HELLO WORLD"]  # speaker 101, words (101 + utterance + k) % 6
    ltr = (dest / "train_10h.ltr").read_text().splitlines()
    assert len(ltr) == 28 and all(line.endswith(" |") for line in ltr)
    # Absent splits are reported and skipped.
    assert not (dest / "train_960.tsv").exists() and not (dest / "test_other.tsv").exists()
    err = capsys.readouterr().err
    assert "train_960" in err and "missing train-clean-360, train-other-500" in err
    assert "test_other" in err and "absent" in err
    # dict.ltr.txt counts the distinct training utterances (train_clean_100 + 10h), no specials.
    counted = (dest / "train_clean_100.ltr").read_text().split() + (
        dest / "train_10h.ltr"
    ).read_text().split()
    dict_lines = (dest / "dict.ltr.txt").read_text().splitlines()
    counts = {line.split()[0]: int(line.split()[1]) for line in dict_lines}
    assert counts == {symbol: counted.count(symbol) for symbol in set(counted)}
    assert dict_lines[0] == f"| {counted.count('|')}"


def test_require_absent_split_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_chapter(tmp_path / "corpus" / "dev-clean", 1, 1)
    assert (
        tools.main(
            [
                "prepare-librispeech",
                str(tmp_path / "corpus"),
                "--dest",
                str(tmp_path / "m"),
                "--require",
                "test_other",
            ]
        )
        == 1
    )
    assert "test_other" in capsys.readouterr().err
    assert (
        tools.main(
            [
                "prepare-librispeech",
                str(tmp_path / "corpus"),
                "--dest",
                str(tmp_path / "m"),
                "--require",
                "dev_clean",
            ]
        )
        == 0
    )
    assert manifest_ids(tmp_path / "m" / "dev_clean.tsv") == ["1-1-0000", "1-1-0001"]
