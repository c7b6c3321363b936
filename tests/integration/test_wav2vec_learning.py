"""wav2vec and vq-wav2vec learn: through the real stage (task module, trainer, checkpoints, tracker),
the accuracy of telling the true future frame from K negatives rises above chance 1 / (1 + K) and the
BCE loss falls below the no-information level; the quantizers log their code usage.

The corpus: utterances of 0.15-0.3 s segments, each a tone of one of five units (own frequency and
loudness), so the frame `offset + k` ahead usually belongs to the same unit and a negative usually not.
A tiny model first settles on the no-information solution (all scores low: BCE = H(1/(1+K)) x (1+K)
per positive) and leaves it after ~100 updates; hence 150-200 updates (seconds of CPU each run).
The k-means quantizer, initialized as fairseq's (code vectors ~ 0.01 N(0, 1) against unit-variance
features), sends every frame to the same few codes at first, so at this scale it shows its mechanics
(k-means loss falling, code usage logged, checkpoint) rather than a rise in accuracy.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
from train_fixtures import pretrain_config  # noqa: E402

from repro.checkpoints.fairseq import load  # noqa: E402
from repro.config import Wav2VecConfig  # noqa: E402
from repro.models.wav2vec import Wav2VecModel  # noqa: E402
from repro.track.jsonl import JsonlTracker  # noqa: E402
from repro.train.stages import run_pretrain  # noqa: E402

NEGATIVES = 4
CHANCE = 1 / (1 + NEGATIVES)
NO_INFORMATION_LOSS = -(CHANCE * np.log2(CHANCE) + (1 - CHANCE) * np.log2(1 - CHANCE)) * (1 + NEGATIVES)  # bits
UPDATES = 150


def write_segment_split(data_dir: Path, split: str, count: int, rng: np.random.Generator) -> None:
    audio_dir = data_dir / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        pieces = []
        for _ in range(int(rng.integers(4, 8))):
            unit, samples = int(rng.integers(0, 5)), int(rng.integers(2400, 4800))
            time = np.arange(samples) / 16000
            pieces.append((0.1 + 0.3 * unit) * np.sin(2 * np.pi * (200 + 300 * unit) * time + rng.uniform(0, 6.28)))
        audio = np.concatenate(pieces)
        audio = (audio + 0.02 * rng.standard_normal(audio.shape)).astype(np.float32)
        sf.write(audio_dir / f"{index:03d}.wav", audio, 16000, subtype="FLOAT")
        rows.append(f"{split}/{index:03d}.wav\t{len(audio)}")
    (data_dir / f"{split}.tsv").write_text(str((data_dir / "audio").resolve()) + "\n" + "\n".join(rows) + "\n")


def tiny_wav2vec(**overrides) -> Wav2VecConfig:
    # the README stack's strides (total 160, receptive field 465 -> offset 3) at toy width
    values = dict(conv_feature_layers="[(32, 10, 5), (32, 8, 4), (32, 4, 2), (32, 4, 2), (32, 4, 2)]",
                  conv_aggregator_layers="[(32, 2, 1), (32, 3, 1), (32, 4, 1)]", skip_connections_agg=True,
                  log_compression=True, num_negatives=NEGATIVES, prediction_steps=4)
    values.update(overrides)
    return Wav2VecConfig(**values)


def curve(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def train_tiny(tmp_path: Path, model: Wav2VecConfig, updates: int, loss_weights: list[float] | None,
               lr: float = 1e-3) -> Path:
    data = tmp_path / "data"
    rng = np.random.default_rng(0)
    write_segment_split(data, "train", 32, rng)
    write_segment_split(data, "valid", 8, rng)
    cfg = pretrain_config(
        data, optimization={"max_update": updates, "lr": [lr]},
        lr_scheduler={"_name": "cosine", "warmup_updates": 10, "warmup_init_lr": 1e-7, "min_lr": 1e-4},
        optimizer={"adam_betas": [0.9, 0.999], "adam_eps": 1e-8, "weight_decay": 0.0},
        criterion={"_name": "wav2vec", "infonce": False, "loss_weights": loss_weights},
        common={"log_interval": 50, "log_format": "none"}, checkpoint={"save_interval_updates": 0},
        dataset={"validate_interval_updates": 0},
    )
    cfg = OmegaConf.merge(cfg, {"model": OmegaConf.structured(model)})
    run_dir = tmp_path / "run"
    tracker = JsonlTracker(run_dir)
    run_pretrain(cfg, run_dir, tracker)
    tracker.finish()
    return run_dir


@pytest.mark.parametrize("variant", ["wav2vec", "vq_gumbel"])
def test_prediction_accuracy_rises_above_chance(tmp_path: Path, variant: str) -> None:
    model = {"wav2vec": tiny_wav2vec(log_compression=False),
             "vq_gumbel": tiny_wav2vec(vq_type="gumbel", vq_vars=16, vq_groups=2, vq_depth=2, activation="gelu",
                                       log_compression=False, vq_temp=[2.0, 0.5, 0.95])}[variant]
    updates = 200
    run_dir = train_tiny(tmp_path, model, updates, None, lr=2e-3)
    train = curve(run_dir, "train")
    assert [r["step"] for r in train] == list(range(50, updates + 1, 50))
    accuracies = [round(r["accuracy"], 3) for r in train]
    assert train[-1]["accuracy"] > CHANCE + 0.1, accuracies
    assert train[-1]["accuracy"] > train[0]["accuracy"] + 0.05, accuracies
    losses = [r["loss"] for r in train]
    assert train[-1]["loss"] < NO_INFORMATION_LOSS and train[-1]["loss"] < train[0]["loss"], losses
    (valid,) = curve(run_dir, "valid")
    assert valid["accuracy"] > CHANCE + 0.1, valid
    if variant == "vq_gumbel":
        # temperature max(2 * 0.95**u, 0.5), averaged over the updates of each logging interval
        assert train[-1]["temp"] == pytest.approx(0.5) and train[0]["temp"] > 0.5
        assert train[-1]["code_perplexity"] > 2.0 and "prob_perplexity" in train[-1]
    loaded = load(run_dir / "checkpoints" / "checkpoint_last.pt")
    assert loaded.kind == "wav2vec" and loaded.model_cfg.vq_type == model.vq_type


def test_kmeans_vq_wav2vec_trains_with_its_loss(tmp_path: Path) -> None:
    model = tiny_wav2vec(vq_type="kmeans", vq_vars=16, vq_groups=2, activation="gelu", log_compression=False)
    run_dir = train_tiny(tmp_path, model, 100, [1.0])  # README: --loss-weights [1]
    train = curve(run_dir, "train")
    assert [r["step"] for r in train] == [50, 100]
    for record in train:
        # loss_1 = 1 x kmeans_loss x sample_size, reported per positive in bits
        assert record["loss_1"] == pytest.approx(record["kmeans_loss"] / np.log(2), rel=0.05)
        assert record["code_perplexity"] >= 1.0
    loaded = load(run_dir / "checkpoints" / "checkpoint_last.pt")
    assert loaded.model_cfg.vq_type == "kmeans" and loaded.model_cfg.vq_vars == 16
    # the code vectors are trained by the k-means loss (they get no other gradient)
    torch.manual_seed(3)  # common.seed of pretrain_config: the initial weights
    initial = Wav2VecModel(model).vector_quantizer.embedding
    assert not torch.allclose(loaded.model.vector_quantizer.embedding, initial)
