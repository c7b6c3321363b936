"""Trainer checkpoints: RNG states, weights_only files, rotation, fallback from a bad checkpoint_last."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch

from repro.checkpoints.format import CheckpointError, atomic_save
from repro.train.checkpoint import (
    BEST,
    LAST,
    CheckpointManager,
    build_checkpoint,
    capture_rng_state,
    interval_checkpoints,
    restore_rng_state,
)


def draws():
    return random.random(), float(np.random.rand()), np.random.randn(), float(torch.rand(1))


def test_rng_state_roundtrip_through_a_weights_only_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    np.random.randn()  # leaves a cached gaussian in numpy's legacy state
    torch.manual_seed(3)
    state = capture_rng_state()
    expected = draws()
    path = tmp_path / "rng.pt"
    torch.save({"rng": state}, path)
    loaded = torch.load(path, weights_only=True)["rng"]
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    assert draws() != expected
    restore_rng_state(loaded)
    assert draws() == expected


def fake_checkpoint(num_updates: int, kind: str = "wav2vec2") -> dict:
    train_state = {
        "num_updates": num_updates, "epoch": 1, "optimizer": None, "lr_scheduler": {"num_updates": num_updates},
        "loss_scaler": None, "sampler": {"epoch": 1, "position": num_updates}, "rng": [capture_rng_state()],
    }
    return build_checkpoint(kind=kind, model_state={"w": torch.full((3,), float(num_updates))},
                            model_cfg={"encoder_layers": 1}, task_cfg={"data": "x"}, dictionary=None,
                            train_state=train_state)


def test_rotation_keeps_last_k_interval_files(tmp_path):
    manager = CheckpointManager(tmp_path, keep_interval_updates=2)
    for update in (2, 4, 6, 8):
        manager.save(fake_checkpoint(update), epoch=1, num_updates=update, interval=True, best=update == 4)
    assert [u for u, _ in interval_checkpoints(tmp_path)] == [8, 6]
    assert torch.load(tmp_path / LAST, weights_only=True)["train_state"]["num_updates"] == 8
    assert torch.load(tmp_path / BEST, weights_only=True)["train_state"]["num_updates"] == 4
    checkpoint, path = manager.load_latest("wav2vec2")
    assert path.name == LAST and checkpoint["train_state"]["num_updates"] == 8


def test_truncated_last_falls_back_to_previous_interval(tmp_path, caplog):
    manager = CheckpointManager(tmp_path, keep_interval_updates=3)
    manager.save(fake_checkpoint(2), epoch=1, num_updates=2, interval=True, best=False)
    manager.save(fake_checkpoint(4), epoch=1, num_updates=4, interval=True, best=False)
    manager.save(fake_checkpoint(5), epoch=1, num_updates=5, interval=False, best=False)  # last only
    data = (tmp_path / LAST).read_bytes()
    (tmp_path / LAST).write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.ERROR):
        checkpoint, path = manager.load_latest("wav2vec2")
    assert path.name == "checkpoint_1_4.pt"
    assert checkpoint["train_state"]["num_updates"] == 4
    assert "truncated" in caplog.text and str(tmp_path / LAST) in caplog.text


def test_foreign_and_wrong_kind_checkpoints_are_skipped(tmp_path, caplog):
    manager = CheckpointManager(tmp_path)
    manager.save(fake_checkpoint(3), epoch=1, num_updates=3, interval=True, best=False)
    torch.save({"model": {}, "args": None}, tmp_path / LAST)  # a fairseq-looking file
    with caplog.at_level(logging.ERROR):
        checkpoint, path = manager.load_latest("wav2vec2")
    assert path.name == "checkpoint_1_3.pt"
    assert "fairseq checkpoint" in caplog.text
    # the same files read by a fine-tuning run: the pretraining checkpoint is not its kind
    with pytest.raises(CheckpointError, match="refusing to start over"):
        manager.load_latest("wav2vec_ctc")


def test_interval_newer_than_last_is_preferred(tmp_path):
    # killed after the interval file was written but before checkpoint_last was replaced
    manager = CheckpointManager(tmp_path)
    manager.save(fake_checkpoint(2), epoch=1, num_updates=2, interval=False, best=False)
    atomic_save(fake_checkpoint(4), tmp_path / "checkpoint_1_4.pt")
    checkpoint, path = manager.load_latest()
    assert path.name == "checkpoint_1_4.pt" and checkpoint["train_state"]["num_updates"] == 4


def test_empty_directory_means_fresh_start(tmp_path):
    assert CheckpointManager(tmp_path / "none").load_latest() is None
