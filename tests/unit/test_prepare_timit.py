"""`prepare-timit` on a TIMIT-layout tree written here: NIST SPHERE `.WAV` files with `.PHN` labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from repro.data.dataset import FileAudioDataset, load_labels
from repro.data.dictionary import Dictionary
from repro.decode.wer import UtteranceResult, score_results
from repro.tools.__main__ import main as tools_main
from repro.tools.prepare_timit import FOLD_61_TO_39, PHONES_39, TimitError, fold_phones, prepare


def write_sphere(path: Path, samples: np.ndarray, sample_rate: int = 16_000) -> None:
    """A NIST SPHERE file as on the TIMIT discs: 1024-byte ASCII header, 16-bit little-endian PCM."""
    lines = ["NIST_1A", "   1024", "database_id -s5 TIMIT", "database_version -s3 1.0", "utterance_id -s8 dab0_sx1",
             "channel_count -i 1", f"sample_count -i {len(samples)}", f"sample_rate -i {sample_rate}",
             "sample_min -i -3000", "sample_max -i 3000", "sample_n_bytes -i 2", "sample_byte_format -s2 01",
             "sample_sig_bits -i 16", "end_head"]
    header = ("\n".join(lines) + "\n").encode("ascii")
    path.write_bytes(header + b" " * (1024 - len(header)) + samples.astype("<i2").tobytes())


PHN = "0 2000 h#\n2000 2600 q\n2600 4000 ix\n4000 5200 dcl\n5200 6000 d\n6000 7000 zh\n7000 9000 h#\n"


def write_speaker(root: Path, part: str, region: str, speaker: str, sentences: list[str], rng) -> None:
    directory = root / part / region / speaker
    directory.mkdir(parents=True)
    for sentence in sentences:
        write_sphere(directory / f"{sentence}.WAV", (rng.standard_normal(9000 + len(sentence) * 160) * 1000))
        (directory / f"{sentence}.PHN").write_text(PHN)
        (directory / f"{sentence}.TXT").write_text("0 9000 Some text.\n")


@pytest.fixture
def timit(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "TIMIT"
    sentences = ["SA1", "SA2", "SI1000", "SX10"]
    write_speaker(root, "TRAIN", "DR1", "FCJF0", sentences, rng)
    write_speaker(root, "TRAIN", "DR2", "MARC0", sentences, rng)
    write_speaker(root, "TEST", "DR1", "MDAB0", sentences, rng)  # core test
    write_speaker(root, "TEST", "DR1", "FAKS0", sentences, rng)  # dev
    write_speaker(root, "TEST", "DR2", "MABC0", sentences, rng)  # neither: the rest of the full test set
    return root


def test_the_folding_is_the_standard_39():
    assert len(FOLD_61_TO_39) == 61 and len(PHONES_39) == 39
    assert FOLD_61_TO_39["q"] is None and FOLD_61_TO_39["ax-h"] == "ah" and FOLD_61_TO_39["zh"] == "sh"
    assert {FOLD_61_TO_39[p] for p in ("bcl", "dcl", "gcl", "kcl", "pcl", "tcl", "pau", "epi", "h#")} == {"sil"}


def test_prepare_timit_writes_the_standard_splits(timit, tmp_path):
    dest = tmp_path / "manifests"
    assert tools_main(["prepare-timit", str(timit), "--dest", str(dest)]) == 0
    for split, speaker in (("train", None), ("dev", "FAKS0"), ("test", "MDAB0")):
        rows = (dest / f"{split}.tsv").read_text().splitlines()
        assert rows[0] == str(timit.resolve())
        paths = [row.split("\t")[0] for row in rows[1:]]
        assert not any("/SA" in path for path in paths)  # SA sentences removed
        assert len(paths) == (4 if split == "train" else 2)
        if speaker:
            assert all(f"/{speaker}/" in path for path in paths)
        labels = (dest / f"{split}.phn").read_text().splitlines()
        assert labels == ["sil ih sil d sh sil"] * len(paths)  # q dropped, closures/h# -> sil, ix -> ih, zh -> sh
    assert not any("MABC0" in (dest / f"{split}.tsv").read_text() for split in ("train", "dev", "test"))
    dictionary = Dictionary.load(dest / "dict.phn.txt")
    assert sorted(dictionary.symbols[dictionary.nspecial:]) == PHONES_39
    assert dictionary.symbols[dictionary.nspecial] == "sil"  # most frequent in train first

    # the fine-tuning data path reads the SPHERE audio and the phone labels as they are
    dataset = FileAudioDataset(dest / "test.tsv", sample_rate=16_000, pad=True)
    assert dataset[0]["source"].shape[0] == 9000 + len("SI1000") * 160
    references = load_labels(dest / "test.phn", dictionary, dataset.skipped_indices, dataset.manifest_rows,
                             dest / "test.tsv")
    assert dictionary.string(references[0]) == "sil ih sil d sh sil"


def test_phone_error_rate_counts_phones(tmp_path):
    result = UtteranceResult(id=0, ref_units="sil ih sil d sh sil", hyp_units="sil ih d sh sil", ref_words="",
                             hyp_words="", audio="a.wav", score=0.0)
    assert score_results([result]).uer == pytest.approx(100 / 6)  # one deleted phone of six


def test_bad_trees_are_named(timit, tmp_path):
    bad = timit / "TRAIN" / "DR1" / "FCJF0" / "SX10.PHN"
    bad.write_text("0 100 h#\n100 200 xx\n")
    with pytest.raises(TimitError, match=r"SX10.PHN:2: 'xx' is not one of the 61 TIMIT phones"):
        fold_phones(bad)
    assert tools_main(["prepare-timit", str(timit), "--dest", str(tmp_path / "out")]) == 1
    with pytest.raises(TimitError, match="no TEST directory"):
        prepare(timit / "TRAIN", tmp_path / "out2", progress=False)
