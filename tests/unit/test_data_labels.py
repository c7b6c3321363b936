"""Labels (fairseq libri_labels.py) and the dictionary tool."""

from pathlib import Path

import numpy as np
import pytest
import soundfile

from repro.data.dictionary import Dictionary
from repro.tools import __main__ as tools


def write_chapter(root: Path, speaker: int, chapter: int, texts: list[str]) -> list[Path]:
    directory = root / str(speaker) / str(chapter)
    directory.mkdir(parents=True, exist_ok=True)
    paths, lines = [], []
    for utterance, text in enumerate(texts):
        utterance_id = f"{speaker}-{chapter}-{utterance:04d}"
        soundfile.write(directory / f"{utterance_id}.flac", np.zeros(160 + utterance, np.float32), 16_000)
        paths.append(directory / f"{utterance_id}.flac")
        lines.append(f"{utterance_id} {text}\n")
    (directory / f"{speaker}-{chapter}.trans.txt").write_text("".join(lines))
    return paths


def test_labels_match_hand_written_lines(tmp_path: Path) -> None:
    write_chapter(tmp_path / "audio", 19, 198, ["HELLO WORLD", "IT'S  A TEST"])
    write_chapter(tmp_path / "audio", 7, 11, ["A"])
    assert (
        tools.main(["manifest", str(tmp_path / "audio"), "--dest", str(tmp_path), "--valid-percent", "0"])
        == 0
    )
    assert (
        tools.main(
            [
                "labels",
                str(tmp_path / "train.tsv"),
                "--output-dir",
                str(tmp_path / "lab"),
                "--output-name",
                "train",
            ]
        )
        == 0
    )
    # Manifest rows are sorted: 19/198/... before 7/11/...
    assert (tmp_path / "lab" / "train.wrd").read_text() == "HELLO WORLD\nIT'S A TEST\nA\n"
    assert (tmp_path / "lab" / "train.ltr").read_text() == (
        "H E L L O | W O R L D |\nI T ' S | A | T E S T |\nA |\n"
    )


def test_missing_transcript_is_an_error_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = write_chapter(tmp_path / "audio", 1, 2, ["ONE", "TWO"])
    orphan = paths[0].parent / "1-2-0099.flac"
    soundfile.write(orphan, np.zeros(100, np.float32), 16_000)
    assert (
        tools.main(["manifest", str(tmp_path / "audio"), "--dest", str(tmp_path), "--valid-percent", "0"])
        == 0
    )
    code = tools.main(
        ["labels", str(tmp_path / "train.tsv"), "--output-dir", str(tmp_path), "--output-name", "x"]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert str(orphan.resolve()) in err and "'1-2-0099'" in err


def test_dictionary_tool_counts_order_and_indices(tmp_path: Path) -> None:
    (tmp_path / "a.ltr").write_text("A B B |\nC C C |\n")
    (tmp_path / "b.ltr").write_text("B <unk> A |\n")
    assert (
        tools.main(
            [
                "dictionary",
                str(tmp_path / "a.ltr"),
                str(tmp_path / "b.ltr"),
                "--dest",
                str(tmp_path / "dict.ltr.txt"),
            ]
        )
        == 0
    )
    # counts: | 3, B 3, C 3, A 2 -> count descending, ties by symbol ('B' < 'C' < '|'); specials left out.
    assert (tmp_path / "dict.ltr.txt").read_text() == "B 3\nC 3\n| 3\nA 2\n"
    dictionary = Dictionary.load(tmp_path / "dict.ltr.txt")
    assert [dictionary.index(s) for s in ["B", "C", "|", "A"]] == [4, 5, 6, 7]
