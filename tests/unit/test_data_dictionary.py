"""Dictionary: fairseq indices, file format, encode/string."""

from pathlib import Path

import pytest

from repro.data.dictionary import Dictionary, DictionaryError

RELEASED_LETTERS = "| E T A O N I H S R D L U M W C F G Y P B V K ' X J Q Z".split()


def test_specials_and_file_order(tmp_path: Path) -> None:
    path = tmp_path / "dict.ltr.txt"
    path.write_text("".join(f"{symbol} {1000 - i}\n" for i, symbol in enumerate(RELEASED_LETTERS)))
    dictionary = Dictionary.load(path)
    assert (dictionary.bos, dictionary.pad, dictionary.eos, dictionary.unk) == (0, 1, 2, 3)
    assert dictionary.symbols[:4] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert len(dictionary) == 32  # the released LibriSpeech letter dictionary: 32 outputs
    assert dictionary.index("|") == 4 and dictionary.index("E") == 5 and dictionary.index("Z") == 31
    assert dictionary.index("@") == 3  # unknown -> unk


def test_encode_and_string() -> None:
    dictionary = Dictionary.from_symbols(["|", "H", "I"])
    assert dictionary.encode_line("H I |  H @\n") == [5, 6, 4, 5, 3]  # no eos appended
    assert dictionary.string([0, 5, 6, 1, 4, 2, 3]) == "H I | <unk>"  # bos/blank, pad, eos dropped


def test_overwrite_flag_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "dict.txt"
    path.write_text("a 5\nb 3\na 9 #fairseq:overwrite\n")
    dictionary = Dictionary.load(path)
    assert dictionary.symbols[4:] == ["a", "b"] and dictionary.counts[4] == 9
    path.write_text("a 5\nb x\n")
    with pytest.raises(DictionaryError, match=r"dict\.txt:2: count 'x'"):
        Dictionary.load(path)
    path.write_text("a 5\na 6\n")
    with pytest.raises(DictionaryError, match=r"dict\.txt:2: duplicate symbol 'a'"):
        Dictionary.load(path)


def test_save_round_trip(tmp_path: Path) -> None:
    dictionary = Dictionary.from_symbols(["|", "E", "T"])
    dictionary.save(tmp_path / "d.txt", counts={"|": 7, "E": 5})
    assert (tmp_path / "d.txt").read_text() == "| 7\nE 5\nT 0\n"
    assert Dictionary.load(tmp_path / "d.txt") == dictionary
