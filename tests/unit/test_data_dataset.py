"""FileAudioDataset + collater + load_labels: fairseq semantics (crop / pad / normalize / skips)."""

from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from repro.data.audio import AudioError
from repro.data.dataset import FileAudioDataset, LabelError, load_labels
from repro.data.dictionary import Dictionary
from repro.data.manifest import ManifestEntry, read_manifest, write_manifest


def make_dataset_files(tmp_path: Path, sizes: list[int]) -> tuple[Path, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    waves, entries = [], []
    for i, size in enumerate(sizes):
        wave = (rng.standard_normal(size) * 0.1 + 0.05).astype(np.float32)
        soundfile.write(tmp_path / f"{i}.wav", wave, 16_000, subtype="FLOAT")  # lossless float
        waves.append(wave)
        entries.append(ManifestEntry(f"{i}.wav", size))
    write_manifest(tmp_path / "train.tsv", tmp_path, entries)
    return tmp_path / "train.tsv", waves


def test_pretraining_crops_to_shortest_with_offsets_from_rng(tmp_path: Path) -> None:
    manifest, waves = make_dataset_files(tmp_path, [1000, 1200, 1500])
    dataset = FileAudioDataset(manifest)
    batch = dataset.collater([dataset[i] for i in range(3)], np.random.default_rng(5))
    source = batch["net_input"]["source"]
    assert source.shape == (3, 1000) and batch["net_input"]["padding_mask"] is None
    replay = np.random.default_rng(5)
    offsets = [0, int(replay.integers(0, 201)), int(replay.integers(0, 501))]  # no draw when nothing to crop
    for row, offset in enumerate(offsets):
        torch.testing.assert_close(source[row], torch.from_numpy(waves[row][offset : offset + 1000]))
    assert batch["id"].tolist() == [0, 1, 2] and batch["ntokens"] == 3000 and "target" not in batch
    # max_sample_size caps the crop below the shortest item.
    capped = FileAudioDataset(manifest, max_sample_size=800)
    assert capped.collater([capped[i] for i in range(3)], np.random.default_rng(0))["net_input"][
        "source"
    ].shape == (3, 800)
    assert capped.num_tokens_vec().tolist() == [800, 800, 800]
    with pytest.raises(ValueError, match="numpy Generator"):
        dataset.collater([dataset[0], dataset[1]])


def test_finetuning_pads_with_mask_and_collates_targets(tmp_path: Path) -> None:
    manifest, waves = make_dataset_files(tmp_path, [1000, 1200, 700])
    labels = [[4, 5], [6], [4, 4, 7]]
    dataset = FileAudioDataset(manifest, labels=labels)  # labels imply padding
    batch = dataset.collater([dataset[i] for i in range(3)], np.random.default_rng(0))
    source, mask = batch["net_input"]["source"], batch["net_input"]["padding_mask"]
    assert source.shape == (3, 1200) and mask.sum(dim=1).tolist() == [200, 0, 500]
    torch.testing.assert_close(source[2, :700], torch.from_numpy(waves[2]))
    assert source[2, 700:].abs().sum() == 0 and mask[2, 700:].all() and not mask[2, :700].any()
    assert batch["target"].tolist() == [[4, 5, 1], [6, 1, 1], [4, 4, 7]]
    assert batch["target_lengths"].tolist() == [2, 1, 3] and batch["ntokens"] == 6
    # With max_sample_size, padding mode still crops items beyond it.
    capped = FileAudioDataset(manifest, pad=True, max_sample_size=900)
    capped_batch = capped.collater([capped[i] for i in range(3)], np.random.default_rng(0))
    assert capped_batch["net_input"]["source"].shape == (3, 900)
    assert capped_batch["net_input"]["padding_mask"].sum(dim=1).tolist() == [0, 0, 200]
    assert capped_batch["ntokens"] == 900 + 900 + 700
    assert dataset.collater([]) == {}


def test_normalize_is_layer_norm_over_the_whole_utterance(tmp_path: Path) -> None:
    manifest, waves = make_dataset_files(tmp_path, [1000])
    item = FileAudioDataset(manifest, normalize=True)[0]["source"]
    wave = waves[0].astype(np.float64)
    expected = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-5)
    np.testing.assert_allclose(item.numpy(), expected, atol=1e-5)
    assert abs(float(item.mean())) < 1e-5


def test_min_sample_size_skips_rows_and_labels_follow(tmp_path: Path) -> None:
    manifest, _ = make_dataset_files(tmp_path, [1000, 300, 1200, 200])
    (tmp_path / "train.ltr").write_text("A |\nB |\nC |\nD |\n")
    dictionary = Dictionary.from_symbols(["|", "A", "B", "C", "D"])
    probe = FileAudioDataset(manifest, min_sample_size=500)
    assert probe.skipped_indices == {1, 3} and probe.sizes.tolist() == [1000, 1200]
    labels = load_labels(tmp_path / "train.ltr", dictionary, probe.skipped_indices, probe.manifest_rows)
    assert labels == [[5, 4], [7, 4]]  # rows 0 and 2: "A |", "C |"
    dataset = FileAudioDataset(manifest, min_sample_size=500, labels=labels)
    assert dataset[1]["target"].tolist() == [7, 4] and len(dataset[1]["source"]) == 1200


def test_label_count_mismatch_names_both_files(tmp_path: Path) -> None:
    manifest, _ = make_dataset_files(tmp_path, [1000, 1100, 1200])
    (tmp_path / "train.ltr").write_text("A |\nB |\n")
    with pytest.raises(LabelError, match=r"train\.ltr has 2 lines but .*train\.tsv has 3 audio rows"):
        load_labels(
            tmp_path / "train.ltr", Dictionary.from_symbols(["|", "A", "B"]), set(), 3, manifest_path=manifest
        )
    with pytest.raises(LabelError, match=r"2 label rows for 3 audio rows of .*train\.tsv"):
        FileAudioDataset(manifest, labels=[[4], [4]])


def test_corrupt_audio_during_training_names_the_path(tmp_path: Path) -> None:
    manifest, _ = make_dataset_files(tmp_path, [1000, 1100])
    dataset = FileAudioDataset(manifest)
    (tmp_path / "1.wav").write_bytes(b"garbage")
    with pytest.raises(AudioError, match=r"1\.wav: cannot read audio"):
        dataset[1]
    soundfile.write(tmp_path / "0.wav", np.zeros(500, np.float32), 16_000)  # replaced by a shorter file
    with pytest.raises(AudioError, match=r"0\.wav: holds 500 samples but the manifest says 1000"):
        dataset[0]


def test_label_and_manifest_lines_end_only_at_newline(tmp_path: Path) -> None:
    """fairseq reads line by line: \\x1c, \\x85, \\u2028 inside a line do not start a new one."""
    manifest, _ = make_dataset_files(tmp_path, [1000, 1100, 1200])
    dictionary = Dictionary.from_symbols(["|", "A", "B", "C"])
    # 2 label lines for 3 audio rows: str.splitlines() made 3 lines of them and shifted the labels.
    (tmp_path / "train.ltr").write_text("A |\nB \x1c C\u2028 |\n", encoding="utf-8")
    with pytest.raises(LabelError, match=r"train\.ltr has 2 lines but .*train\.tsv has 3 audio rows"):
        load_labels(tmp_path / "train.ltr", dictionary, set(), 3, manifest_path=manifest)
    (tmp_path / "train.ltr").write_text("A |\nB \x85 |\nC |\n", encoding="utf-8")
    labels = load_labels(tmp_path / "train.ltr", dictionary, set(), 3, manifest_path=manifest)
    assert labels == [[5, 4], [6, 4], [7, 4]]  # \x85 separates tokens within its line, as in fairseq
    # A manifest path holding such a character stays one row.
    (tmp_path / "odd.tsv").write_text("/root\na\x85b\u2028c.flac\t10\nd.flac\t20\n", encoding="utf-8")
    entries = read_manifest(tmp_path / "odd.tsv").entries
    assert [(entry.rel_path, entry.num_samples) for entry in entries] == [("a\x85b\u2028c.flac", 10), ("d.flac", 20)]
    # fairseq's Dictionary.add_from_file reads line by line too: one symbol per line.
    (tmp_path / "dict.ltr.txt").write_text("| 10\nA\x1cB 5\nC 3\n", encoding="utf-8")
    loaded = Dictionary.load(tmp_path / "dict.ltr.txt")
    assert loaded.symbols[4:] == ["|", "A\x1cB", "C"]


def test_labels_missing_from_the_dictionary_fail_with_file_and_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    manifest, _ = make_dataset_files(tmp_path, [1000, 1100])
    (tmp_path / "dict.ltr.txt").write_text("| 4\nA 2\nB 2\n", encoding="utf-8")
    dictionary = Dictionary.load(tmp_path / "dict.ltr.txt")
    # A lower-case copy of the labels: every letter would silently become <unk>.
    (tmp_path / "train.ltr").write_text("A B |\na b |\n", encoding="utf-8")
    with pytest.raises(LabelError) as refused:
        load_labels(tmp_path / "train.ltr", dictionary, set(), 2, manifest_path=manifest)
    message = str(refused.value)
    assert message.startswith(f"{tmp_path / 'train.ltr'}:2: 2 of 6 label tokens (33.33%) are not in ")
    assert str(tmp_path / "dict.ltr.txt") in message
    assert "'a' x1 (first on line 2), 'b' x1 (first on line 2)" in message
    # Rows the dataset skips (min_sample_size) are not counted.
    assert load_labels(tmp_path / "train.ltr", dictionary, {1}, 2) == [[5, 6, 4]]
    # One stray symbol in a large file: encoded as <unk> (as fairseq does), with a warning naming it.
    lines = ["A B |"] * 999 + ["A \u00e9 |"]
    (tmp_path / "big.ltr").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="repro.data.dataset"):
        labels = load_labels(tmp_path / "big.ltr", dictionary, set(), 1000)
    assert labels[-1] == [5, dictionary.unk, 4]
    assert f"{tmp_path / 'big.ltr'}:1000: 1 of 3000 label tokens" in caplog.text and "'\u00e9' x1" in caplog.text
