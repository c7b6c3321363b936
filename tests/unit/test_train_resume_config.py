"""Resuming a run directory under a changed config: refused with the differences, unless fairseq's
checkpoint.reset_* flags accept them (repro/train/resume.py)."""

from __future__ import annotations

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_train_trainer import HOOKS, ToyDataset, ToyModel, toy_cfg

from repro.train.optim import polynomial_decay_lr
from repro.train.resume import ResumeConfigError, config_changes, resets_for_resume
from repro.train.trainer import SplitData, Trainer

ALL_RESETS = {"reset_optimizer": True, "reset_lr_scheduler": True, "reset_dataloader": True, "reset_meters": True}


def toy_trainer(run_dir, **overrides) -> Trainer:
    data = SplitData("train", ToyDataset(), [np.arange(i, i + 8) for i in range(0, 64, 8)])  # 8 batches an epoch
    return Trainer(toy_cfg(**overrides), ToyModel(), HOOKS, data, run_dir=run_dir)


def resolved(**overrides) -> dict:
    return OmegaConf.to_container(toy_cfg(**overrides), resolve=True)


@pytest.fixture()
def trained(tmp_path):
    """A run directory whose checkpoint_last is at update 5 (mid-epoch), lr 0.05, max_update 5."""
    toy_trainer(tmp_path, optimization={"max_update": 5}).fit()
    return tmp_path


def test_a_changed_learning_rate_is_refused_with_the_differences(trained):
    with pytest.raises(ResumeConfigError) as refused:
        toy_trainer(trained, optimization={"lr": [0.1], "max_update": 10}).fit()
    message = str(refused.value)
    assert "checkpoint_last.pt was trained with another config" in message
    assert "optimization.lr: [0.05] -> [0.1]  (checkpoint.reset_lr_scheduler=true accepts it)" in message
    # polynomial_decay without total_num_update is stretched over max_update: a schedule change too
    assert "optimization.max_update: 5 -> 10" in message


def test_reset_lr_scheduler_continues_under_the_new_schedule_and_keeps_the_rest(trained):
    trainer = toy_trainer(trained, optimization={"lr": [0.1], "max_update": 10},
                          checkpoint={"reset_lr_scheduler": True})
    assert trainer.resume()
    assert trainer.num_updates == 5
    assert trainer.get_lr() == pytest.approx(polynomial_decay_lr(5, 0.1, 2, 10, 0.0, 1.0))
    assert len(trainer.optimizer.state) > 0  # Adam moments kept
    assert trainer.train_stream.state_dict() == {"epoch": 1, "position": 5}


def test_seed_and_mask_probability_need_all_four_resets_then_only_weights_are_kept(trained):
    for change in ({"common": {"seed": 2}}, {"model": {"mask_prob": 0.5}}):
        with pytest.raises(ResumeConfigError, match="all four checkpoint.reset_.=true keep only the weights"):
            toy_trainer(trained, **change, checkpoint={"reset_lr_scheduler": True, "reset_dataloader": True}).resume()
    trainer = toy_trainer(trained, common={"seed": 2}, checkpoint=ALL_RESETS)
    assert trainer.resume()
    assert trainer.num_updates == 5  # kept (fairseq restarts it; our files are ordered by update)
    assert len(trainer.optimizer.state) == 0  # fresh Adam
    assert trainer.train_stream.state_dict() == {"epoch": 1, "position": 0}  # data order from the start


def test_reset_flags_do_nothing_while_the_config_is_unchanged(trained):
    # a requeued job keeps its frozen flags; once the checkpoint carries the config, resume stays exact
    trainer = toy_trainer(trained, optimization={"max_update": 5}, checkpoint=ALL_RESETS)
    assert trainer.resume()
    assert len(trainer.optimizer.state) > 0
    assert trainer.train_stream.state_dict() == {"epoch": 1, "position": 5}


def test_what_does_not_change_training_may_change():
    saved = resolved()
    current = resolved(common={"log_interval": 50, "cpu": False}, dataset={"num_workers": 4},
                       tracker={"backends": ["mlflow"]}, distributed_training={"distributed_world_size": 8},
                       checkpoint={"save_interval_updates": 100, "keep_interval_updates": 1},
                       optimization={"max_epoch": 3}, cluster={"name": "slurm"}, criterion={"log_keys": []})
    assert config_changes(saved, current) == []
    assert resets_for_resume(saved, current, "ckpt") == frozenset()


def test_max_update_is_only_a_stopping_point_when_the_schedule_does_not_depend_on_it():
    fixed_length = {"_name": "polynomial_decay", "total_num_update": 100}
    saved = resolved(lr_scheduler=fixed_length, optimization={"max_update": 50})
    assert config_changes(saved, resolved(lr_scheduler=fixed_length, optimization={"max_update": 100})) == []
    tri_stage = {"_name": "tri_stage"}
    changes = config_changes(resolved(lr_scheduler=tri_stage, optimization={"max_update": 50}),
                             resolved(lr_scheduler=tri_stage, optimization={"max_update": 100}))
    assert [(c.key, c.accepted_by) for c in changes] == [("optimization.max_update", "reset_lr_scheduler")]


def test_each_flag_accepts_its_own_changes_only():
    saved = resolved()
    current = resolved(optimizer={"adam_eps": 1e-6}, dataset={"max_tokens": 999}, checkpoint={
        "best_checkpoint_metric": "wer", "reset_optimizer": True, "reset_dataloader": True})
    with pytest.raises(ResumeConfigError) as refused:
        resets_for_resume(saved, current, "ckpt")
    assert refused.value.args[0].count("\n  ") == 1  # only the metric change is left
    assert "checkpoint.best_checkpoint_metric: 'loss' -> 'wer'  (checkpoint.reset_meters=true accepts it)" in str(
        refused.value)
    current["checkpoint"]["reset_meters"] = True
    assert resets_for_resume(saved, current, "ckpt") == {"reset_optimizer", "reset_dataloader", "reset_meters"}
