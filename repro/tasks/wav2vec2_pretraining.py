"""wav2vec 2.0 pretraining (task `audio_pretraining`, model `wav2vec2`, criterion `wav2vec` with infonce).

Data: `<task.data>/<train_subset>.tsv` cropped to task.max_sample_size; model: Wav2Vec2Model from
`model`; loss: the contrastive InfoNCE loss plus the weighted diversity and feature-penalty terms
(`criterion.loss_weights`); validation: the same loss on `<valid_subset>.tsv`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from omegaconf import DictConfig

from repro.config import ModelConfig
from repro.losses.contrastive import contrastive_loss
from repro.models.wav2vec2 import Wav2Vec2Model
from repro.tasks.common import TaskHooks, TaskSetup, audio_splits, model_config, plain, reduce_contrastive

KIND = "wav2vec2"
STAGE = "pretrain"


def pretraining_hooks(cfg: DictConfig, model_cfg: ModelConfig) -> TaskHooks:
    loss_weights = list(cfg.criterion.loss_weights) if cfg.criterion.loss_weights is not None else None
    if not cfg.criterion.infonce:
        raise ValueError("criterion.infonce=false (binary cross-entropy) is wav2vec v1's loss, not wav2vec 2.0's")

    def compute_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        net_output = model(**batch["net_input"])
        return contrastive_loss(net_output, loss_weights)

    def valid_batch(model: torch.nn.Module, batch: dict) -> dict[str, float]:
        return compute_loss(model, batch)[1]

    stored_cfg: dict[str, Any] = dataclasses.asdict(model_cfg)
    stored_cfg["normalize"] = bool(cfg.task.normalize)  # fine-tuning checks it against its own (§3.1)
    return TaskHooks(
        kind=KIND, compute_loss=compute_loss, reduce_train=reduce_contrastive, valid_batch=valid_batch,
        reduce_valid=reduce_contrastive, model_cfg=stored_cfg, task_cfg=plain(cfg.task), dictionary=None,
        find_unused_parameters=model_cfg.encoder_layerdrop > 0 or model_cfg.feature_grad_mult == 0,
    )


def build(cfg: DictConfig, resume: dict[str, Any] | None) -> TaskSetup:
    """The model (random weights; a resumed run's come from `resume` via the trainer), hooks and data."""
    model_cfg = model_config(cfg.model)
    model = Wav2Vec2Model(model_cfg)
    train, valid = audio_splits(cfg)
    return TaskSetup(model, pretraining_hooks(cfg, model_cfg), train, valid)
