"""`featurize` and `tokenize` (fairseq's wav2vec_featurize.py / vq-wav2vec_featurize.py formats).

Outputs are checked against the model run file by file, as fairseq's scripts do (the tools batch padded
files; the model's normalizations skip the padding, so the rows must equal the per-file runs); resume
after an interruption reproduces the uninterrupted output; bad inputs fail with the file named.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import require

from repro.checkpoints.format import atomic_save, model_file
from repro.config import Wav2VecConfig, stored_model_config
from repro.models.presets import PRESETS
from repro.models.wav2vec import Wav2VecModel
from repro.tools import featurize, tokenize
from repro.tools.audio_units import UnitsError

LAYERS = dict(conv_feature_layers="[(16, 10, 5), (16, 8, 4), (16, 4, 2), (16, 4, 2)]",
              conv_aggregator_layers="[(16, 2, 1), (16, 3, 1)]", skip_connections_agg=True, num_negatives=2,
              prediction_steps=2)


def save_model(path: Path, **overrides) -> Wav2VecModel:
    torch.manual_seed(0)
    cfg = Wav2VecConfig(**{**LAYERS, **overrides})
    model = Wav2VecModel(cfg).eval()
    atomic_save(model_file(kind="wav2vec", model_state=model.state_dict(), model_cfg=stored_model_config(cfg),
                           task_cfg={}, dictionary=None), path)
    return model


def write_corpus(root: Path, lengths: list[int], rate: int = 16_000) -> list[np.ndarray]:
    """`root/train/*.wav` + `root/train.tsv` + `root/train.ltr` and a label file beside the audio."""
    rng = np.random.default_rng(0)
    (root / "train").mkdir(parents=True)
    waves, rows = [], []
    for index, length in enumerate(lengths):
        wave = (0.3 * rng.standard_normal(length)).astype(np.float32)
        sf.write(root / "train" / f"utt{index}.wav", wave, rate, subtype="FLOAT")
        waves.append(wave)
        rows.append(f"train/utt{index}.wav\t{length}")
    (root / "train.tsv").write_text(f"{root}\n" + "\n".join(rows) + "\n")
    (root / "train.ltr").write_text("".join(f"L {i} |\n" for i in range(len(lengths))))
    (root / "train" / "train.wrd").write_text("words\n")
    return waves


def codes_alone(model: Wav2VecModel, wave: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        return model.vector_quantizer.forward_idx(model.feature_extractor(torch.from_numpy(wave)[None]))[1][0]


LENGTHS = [5200, 3000, 7400, 2600, 4100]


@pytest.mark.parametrize("vq_type", ["gumbel", "kmeans"])
def test_tokenize_writes_fairseq_lines_and_a_dictionary(tmp_path: Path, vq_type: str) -> None:
    model = save_model(tmp_path / "vq.pt", vq_type=vq_type, vq_vars=8, combine_groups=vq_type == "gumbel",
                       vq_depth=2 if vq_type == "gumbel" else 1)
    waves = write_corpus(tmp_path / "data", LENGTHS)
    args = argparse.Namespace(checkpoint=tmp_path / "vq.pt", data_dir=tmp_path / "data",
                              output_dir=tmp_path / "units", splits=["train"], extension="tsv", labels="ltr",
                              max_size=1_300_000, device="cpu", batch_samples=12_000, num_workers=0)
    assert tokenize.main(args) == 0
    lines = (tmp_path / "units" / "train.src").read_text().splitlines()
    assert len(lines) == len(LENGTHS)
    for line, wave in zip(lines, waves):
        expected = codes_alone(model, wave)  # (T, 2)
        assert line == " ".join(f"{int(a)}-{int(b)}" for a, b in expected.tolist())
    assert (tmp_path / "units" / "train.lbl").read_text() == (tmp_path / "data" / "train.ltr").read_text()
    entries = [row.split(" ") for row in (tmp_path / "units" / "dict.txt").read_text().splitlines()]
    counts = [int(count) for _, count in entries]
    assert counts == sorted(counts, reverse=True)
    assert sum(counts) == sum(len(line.split()) for line in lines)
    assert all(len(symbol.split("-")) == 2 and all(0 <= int(g) < 8 for g in symbol.split("-")) for symbol, _ in entries)


def test_long_files_are_cut_into_equal_chunks_as_fairseq(tmp_path: Path) -> None:
    model = save_model(tmp_path / "vq.pt", vq_type="kmeans", vq_vars=8)
    waves = write_corpus(tmp_path / "data", [7400])
    assert tokenize.chunk_bounds(7400, 3000) == [(0, 2467), (2467, 4934), (4934, 7400)]  # div 3, torch.chunk
    path = tokenize.tokenize_split(tmp_path / "vq.pt", tmp_path / "data", tmp_path / "units", "train",
                                   max_size=3000, device="cpu", num_workers=0, progress=False)
    pieces = torch.from_numpy(waves[0]).chunk(3)
    expected = torch.cat([codes_alone(model, piece.numpy()) for piece in pieces])
    assert path.read_text().strip() == tokenize.code_string(expected)


def test_an_interrupted_split_resumes_where_it_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_model(tmp_path / "vq.pt", vq_type="kmeans", vq_vars=8)
    write_corpus(tmp_path / "data", LENGTHS)
    kwargs = dict(device="cpu", num_workers=0, progress=False)
    reference = tokenize.tokenize_split(tmp_path / "vq.pt", tmp_path / "data", tmp_path / "ref", "train", **kwargs)
    monkeypatch.setattr(tokenize, "WINDOW", 2)
    original, calls = tokenize.tokenize_files, []

    def failing_second_window(model, files, *args):
        calls.append(len(files))
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed while the second window runs
        return original(model, files, *args)

    monkeypatch.setattr(tokenize, "tokenize_files", failing_second_window)
    with pytest.raises(KeyboardInterrupt):
        tokenize.tokenize_split(tmp_path / "vq.pt", tmp_path / "data", tmp_path / "out", "train", **kwargs)
    assert len((tmp_path / "out" / "train.src.partial").read_text().splitlines()) == 2
    assert not (tmp_path / "out" / "train.src").exists()
    monkeypatch.setattr(tokenize, "tokenize_files", original)
    resumed = tokenize.tokenize_split(tmp_path / "vq.pt", tmp_path / "data", tmp_path / "out", "train", **kwargs)
    assert resumed.read_text() == reference.read_text()
    assert not (tmp_path / "out" / "train.src.partial").exists()


def test_tokenize_refuses_models_without_a_vq_tokenizer_and_8khz_audio(tmp_path: Path) -> None:
    write_corpus(tmp_path / "data", [4000])
    wav2vec2 = PRESETS["tiny"]
    from repro.models.wav2vec2 import Wav2Vec2Model

    atomic_save(model_file(kind="wav2vec2", model_state=Wav2Vec2Model(wav2vec2).state_dict(),
                           model_cfg=dataclasses.asdict(wav2vec2), task_cfg={}, dictionary=None),
                tmp_path / "w2v2.pt")
    with pytest.raises(UnitsError, match="w2v2.pt holds a wav2vec 2.0 model"):
        tokenize.tokenize_split(tmp_path / "w2v2.pt", tmp_path / "data", tmp_path / "out", "train")
    save_model(tmp_path / "plain.pt")
    with pytest.raises(UnitsError, match="plain.pt is a wav2vec model without a quantizer"):
        tokenize.tokenize_split(tmp_path / "plain.pt", tmp_path / "data", tmp_path / "out", "train")
    save_model(tmp_path / "vq.pt", vq_type="kmeans", vq_vars=8)
    write_corpus(tmp_path / "narrowband", [4000], rate=8000)
    with pytest.raises(UnitsError, match=r"utt0.wav \(.*train.tsv, row 1\): sample rate 8000 Hz"):
        tokenize.tokenize_split(tmp_path / "vq.pt", tmp_path / "narrowband", tmp_path / "out", "train",
                                device="cpu", num_workers=0)
    args = argparse.Namespace(checkpoint=tmp_path / "plain.pt", data_dir=tmp_path / "data", output_dir=tmp_path / "o",
                              splits=["train"], extension="tsv", labels=None, max_size=1_300_000, device="cpu",
                              batch_samples=None, num_workers=0)
    assert tokenize.main(args) == 1


def test_featurize_writes_flashlight_h5_and_resumes(tmp_path: Path) -> None:
    require(importlib.util.find_spec("h5py") is not None, "h5py is not installed (featurize writes HDF5)")
    model = save_model(tmp_path / "w2v.pt", log_compression=True)
    waves = write_corpus(tmp_path / "data", LENGTHS)
    args = argparse.Namespace(input=tmp_path / "data", output=tmp_path / "feats", model=tmp_path / "w2v.pt",
                              split=["train"], ext="wav", no_copy_labels=False, use_feat=False, gpu=None,
                              device="cpu", batch_samples=12_000, num_workers=0)
    assert featurize.main(args) == 0
    import h5py

    for index, wave in enumerate(waves):
        path = tmp_path / "feats" / "train" / f"utt{index}.h5context"
        with torch.no_grad():
            c = model.feature_aggregator(model.feature_extractor(torch.from_numpy(wave)[None]))[0]
        with h5py.File(path, "r") as data:
            info = data["info"][()]
            flat = data["features"][()]
        channels, frames = c.shape
        assert info.tolist() == [100.0, frames, channels]  # [16e3 // 160, T, C]
        np.testing.assert_allclose(flat, c.T.reshape(-1).numpy(), atol=1e-5, rtol=1e-4)  # time-major
    assert (tmp_path / "feats" / "train" / "train.wrd").read_text() == "words\n"  # labels copied
    stamp = (tmp_path / "feats" / "train" / "utt0.h5context").stat().st_mtime_ns
    (tmp_path / "feats" / "train" / "utt3.h5context").unlink()  # as if killed before this file
    counts = featurize.featurize_split(tmp_path / "w2v.pt", tmp_path / "data", tmp_path / "feats", "train",
                                       device="cpu", num_workers=0, progress=False)
    assert counts["written"] == 1 and counts["skipped"] == len(LENGTHS) - 1
    assert (tmp_path / "feats" / "train" / "utt0.h5context").stat().st_mtime_ns == stamp
    np.testing.assert_allclose(featurize.read_h5(tmp_path / "feats" / "train" / "utt3.h5context"),
                               model.feature_aggregator(model.feature_extractor(
                                   torch.from_numpy(waves[3])[None]))[0].detach().numpy(), atol=1e-5, rtol=1e-4)


def test_featurize_says_when_it_gets_the_wrong_model(tmp_path: Path) -> None:
    require(importlib.util.find_spec("h5py") is not None, "h5py is not installed (featurize writes HDF5)")
    write_corpus(tmp_path / "data", [4000])
    from repro.models.wav2vec2 import Wav2Vec2Model

    atomic_save(model_file(kind="wav2vec2", model_state=Wav2Vec2Model(PRESETS["tiny"]).state_dict(),
                           model_cfg=dataclasses.asdict(PRESETS["tiny"]), task_cfg={}, dictionary=None),
                tmp_path / "w2v2.pt")
    with pytest.raises(UnitsError, match="featurize: .*w2v2.pt holds a wav2vec 2.0 model"):
        featurize.featurize_split(tmp_path / "w2v2.pt", tmp_path / "data", tmp_path / "feats", "train")


def test_tokenized_units_and_labels_are_what_roberta_ctc_reads(tmp_path: Path) -> None:
    """tokenize --labels ltr writes fairseq's `<split>.lbl` and copies dict.ltr.txt; the roberta_ctc task loads
    that directory as it stands, and names the label file when there is none."""
    from omegaconf import OmegaConf

    from repro.config import ReproConfig
    from repro.data.dictionary import Dictionary
    from repro.data.units import load_unit_dictionary
    from repro.tasks.roberta_ctc import labeled_unit_split

    save_model(tmp_path / "vq.pt", vq_type="kmeans", vq_vars=8)
    write_corpus(tmp_path / "data", LENGTHS)
    (tmp_path / "data" / "dict.ltr.txt").write_text("| 5\nL 5\n" + "".join(f"{i} 1\n" for i in range(len(LENGTHS))))
    units_dir = tmp_path / "units"
    args = argparse.Namespace(checkpoint=tmp_path / "vq.pt", data_dir=tmp_path / "data", output_dir=units_dir,
                              splits=["train"], extension="tsv", labels="ltr", max_size=1_300_000, device="cpu",
                              batch_samples=None, num_workers=0)
    assert tokenize.main(args) == 0
    assert (units_dir / "train.lbl").is_file() and not (units_dir / "train.ltr").exists()
    cfg = OmegaConf.structured(ReproConfig)
    cfg.task.data, cfg.task.labels, cfg.dataset.max_tokens = str(units_dir), "ltr", 100_000
    units, _ = load_unit_dictionary(units_dir / "dict.txt")
    letters = Dictionary.load(units_dir / "dict.ltr.txt")
    split = labeled_unit_split(cfg, "train", units, letters, max_positions=512, validation=False)
    assert len(split.dataset) == len(LENGTHS)
    src_lines = (units_dir / "train.src").read_text().splitlines()
    for index in range(len(LENGTHS)):
        sample = split.dataset[index]
        assert letters.string(list(sample["target"])) == f"L {index} |"  # the utterance's own label line
        assert units.string(list(sample["tokens"])[1:-1]) == src_lines[index]  # <s> units </s>
    (units_dir / "train.lbl").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.ltr: label file of split 'train' not found \(nor train\.lbl"):
        labeled_unit_split(cfg, "train", units, letters, max_positions=512, validation=False)
