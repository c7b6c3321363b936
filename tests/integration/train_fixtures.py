"""Tiny synthetic corpora and configs for the training-engine tests (CPU, seconds).

Audio: each letter of a small alphabet is a pure tone of its own frequency (plus noise), an
utterance is the tones of its transcript one after another, so CTC has something to learn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from omegaconf import DictConfig, OmegaConf

from repro.config import ReproConfig
from repro.models.presets import PRESETS

SAMPLE_RATE = 16_000
LETTERS = "ABCDE"
WORDS = ["AB", "CAB", "DE", "BEAD", "ACE", "DAD"]
TONE_SAMPLES = 1600  # 0.1 s per letter
WORD_GAP_SAMPLES = 800


def synth_utterance(words: list[str], rng: np.random.Generator) -> np.ndarray:
    pieces = [np.zeros(WORD_GAP_SAMPLES, dtype=np.float32)]
    time = np.arange(TONE_SAMPLES) / SAMPLE_RATE
    for word in words:
        for letter in word:
            frequency = 300.0 + 250.0 * LETTERS.index(letter)
            pieces.append((0.4 * np.sin(2 * np.pi * frequency * time + rng.uniform(0, 6.28))).astype(np.float32))
        pieces.append(np.zeros(WORD_GAP_SAMPLES, dtype=np.float32))
    audio = np.concatenate(pieces)
    return (audio + 0.02 * rng.standard_normal(audio.shape)).astype(np.float32)


def write_split(data_dir: Path, split: str, count: int, rng: np.random.Generator) -> None:
    audio_dir = data_dir / "audio" / split
    audio_dir.mkdir(parents=True, exist_ok=True)
    rows, labels = [], []
    for index in range(count):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(2, 5)))]
        audio = synth_utterance(words, rng)
        name = f"{split}_{index:03d}.wav"
        sf.write(audio_dir / name, audio, SAMPLE_RATE, subtype="FLOAT")
        rows.append(f"{split}/{name}\t{len(audio)}")
        labels.append(" ".join(" ".join(word) + " |" for word in words))
    (data_dir / f"{split}.tsv").write_text(str((data_dir / "audio").resolve()) + "\n" + "\n".join(rows) + "\n")
    (data_dir / f"{split}.ltr").write_text("\n".join(labels) + "\n")


def make_corpus(data_dir: Path, train: int = 24, valid: int = 8, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    write_split(data_dir, "train", train, rng)
    write_split(data_dir, "valid", valid, rng)
    (data_dir / "dict.ltr.txt").write_text("".join(f"{symbol} 10\n" for symbol in ["|", *LETTERS]))
    return data_dir


def tiny_model(**overrides: Any) -> dict[str, Any]:
    values = OmegaConf.to_container(OmegaConf.structured(PRESETS["tiny"]))
    values.update(overrides)
    return values


def pretrain_config(data_dir: Path, **overrides: Any) -> DictConfig:
    cfg = OmegaConf.structured(ReproConfig)
    base = {
        "common": {"seed": 3, "cpu": True, "log_interval": 1, "log_format": "json"},
        "task": {"_name": "audio_pretraining", "data": str(data_dir), "max_sample_size": 12000,
                 "min_sample_size": 4000},
        "dataset": {"max_tokens": 48000, "num_workers": 0, "valid_subset": "valid",
                    "required_batch_size_multiple": 1},
        "model": tiny_model(mask_prob=0.5, mask_length=4, encoder_layerdrop=0.1),
        "criterion": {"_name": "wav2vec", "infonce": True, "loss_weights": [0.1, 10.0]},
        "optimization": {"max_update": 6, "lr": [5e-3]},
        "optimizer": {"adam_betas": [0.9, 0.98], "adam_eps": 1e-6, "weight_decay": 0.01},
        "lr_scheduler": {"_name": "polynomial_decay", "warmup_updates": 3},
        "checkpoint": {"save_interval_updates": 2, "keep_interval_updates": 2},
        "tracker": {"backends": []},
    }
    return OmegaConf.merge(cfg, base, overrides)


def finetune_config(data_dir: Path, w2v_path: str | None, **overrides: Any) -> DictConfig:
    cfg = OmegaConf.structured(ReproConfig)
    base = {
        "common": {"seed": 5, "cpu": True, "log_interval": 1, "log_format": "json"},
        "task": {"_name": "audio_finetuning", "data": str(data_dir), "labels": "ltr"},
        "dataset": {"max_tokens": 64000, "num_workers": 0, "valid_subset": "valid",
                    "required_batch_size_multiple": 1, "validate_interval_updates": 4},
        "model": tiny_model(_name="wav2vec_ctc", w2v_path=w2v_path, no_pretrained_weights=w2v_path is None,
                            apply_mask=True, mask_prob=0.3, mask_length=3, mask_channel_prob=0.2,
                            mask_channel_length=4, layerdrop=0.1, feature_grad_mult=0.0,
                            activation_dropout=0.1, freeze_finetune_updates=2),
        "criterion": {"_name": "ctc", "zero_infinity": True, "post_process": "letter"},
        "optimization": {"max_update": 6, "lr": [1e-3], "sentence_avg": True},
        "optimizer": {"adam_betas": [0.9, 0.98], "adam_eps": 1e-8, "weight_decay": 0.0},
        "lr_scheduler": {"_name": "tri_stage", "phase_ratio": [0.25, 0.25, 0.5], "final_lr_scale": 0.05},
        "checkpoint": {"save_interval_updates": 2, "keep_interval_updates": 2, "best_checkpoint_metric": "wer"},
        "tracker": {"backends": []},
    }
    return OmegaConf.merge(cfg, base, overrides)
