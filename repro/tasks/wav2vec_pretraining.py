"""wav2vec and vq-wav2vec pretraining (task `audio_pretraining`, model `wav2vec`, criterion `wav2vec`
with infonce=false: binary cross-entropy, fairseq_spec.md §8).

Data: `<task.data>/<train_subset>.tsv` cropped to task.max_sample_size (every utterance of a batch to
the shortest one, no padding, as fairseq's v1 recipes); model: Wav2VecModel from `model`; loss: BCE
over the step predictions plus, with `criterion.loss_weights`, the quantizer's extra loss (k-means:
`loss_weights [1]`); logged: loss, accuracy (ours), prob_perplexity / code_perplexity / temp (Gumbel)
or kmeans_loss / code_perplexity (k-means).
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig

from repro.config import Wav2VecConfig, stored_model_config
from repro.losses.contrastive import binary_contrastive_loss
from repro.models.wav2vec import Wav2VecModel
from repro.tasks.common import TaskHooks, TaskSetup, audio_splits, model_config, plain, reduce_contrastive

KIND = "wav2vec"
STAGE = "pretrain"


def wav2vec_hooks(cfg: DictConfig, model_cfg: Wav2VecConfig) -> TaskHooks:
    if cfg.criterion.infonce:
        raise ValueError("model._name=wav2vec trains with binary cross-entropy as the wav2vec and vq-wav2vec "
                         "README commands: set criterion.infonce=false")
    if cfg.task.enable_padding:
        raise ValueError("task.enable_padding=true: the wav2vec model has no padding mask (fairseq crops every "
                         "utterance of a batch to the shortest); set it false")
    loss_weights = list(cfg.criterion.loss_weights) if cfg.criterion.loss_weights is not None else None
    balanced = bool(model_cfg.balanced_classes)

    def compute_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        net_output = model(batch["net_input"]["source"])
        return binary_contrastive_loss(net_output, loss_weights, balanced)

    def valid_batch(model: torch.nn.Module, batch: dict) -> dict[str, float]:
        return compute_loss(model, batch)[1]

    # the k-means code vectors only learn through kmeans_loss: without loss_weights they get no gradient
    unused = model_cfg.vq_type == "kmeans" and not loss_weights
    return TaskHooks(
        kind=KIND, compute_loss=compute_loss, reduce_train=reduce_contrastive, valid_batch=valid_batch,
        reduce_valid=reduce_contrastive, model_cfg=stored_model_config(model_cfg), task_cfg=plain(cfg.task),
        dictionary=None, find_unused_parameters=unused,
    )


def build(cfg: DictConfig, resume: dict[str, Any] | None) -> TaskSetup:
    """The model (random weights; a resumed run's come from `resume` via the trainer), hooks and data."""
    model_cfg = model_config(cfg.model, Wav2VecConfig)
    model = Wav2VecModel(model_cfg)
    train, valid = audio_splits(cfg)
    return TaskSetup(model, wav2vec_hooks(cfg, model_cfg), train, valid)
