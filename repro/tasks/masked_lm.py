"""Masked-LM pretraining of RoBERTa on discrete units (task `masked_lm`, model `roberta`, criterion `masked_lm`).

Data: `<task.data>/<split>.<task.source_ext>` (one utterance of code strings per line, tokenize's output)
and `<task.data>/dict.txt`; samples `<s> units </s>` (fairseq sample_break_mode eos), masked in the
collater with fairseq's MaskTokensDataset rules and span options. Model: RobertaModel from `model`.
Loss: cross-entropy of the predicted positions, logged as fairseq's masked_lm criterion (loss in bits
per predicted token, ppl) plus the MLM accuracy.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from repro.data.dictionary import Dictionary
from repro.data.units import MaskedUnitDataset, MaskingConfig, load_unit_dictionary
from repro.losses.masked_lm import masked_lm_loss, reduce_masked_lm
from repro.models.roberta import RobertaModel
from repro.tasks.common import (
    SplitData,
    TaskHooks,
    TaskSetup,
    make_batches,
    model_config,
    plain,
    valid_splits,
)

KIND = "roberta"
STAGE = "pretrain"
DICTIONARY_NAME = "dict.txt"


def masking_config(task: DictConfig) -> MaskingConfig:
    return MaskingConfig(mask_prob=float(task.mask_prob), leave_unmasked_prob=float(task.leave_unmasked_prob),
                         random_token_prob=float(task.random_token_prob),
                         mask_multiple_length=int(task.mask_multiple_length), mask_stdev=float(task.mask_stdev))


def unit_split(cfg: DictConfig, split: str, dictionary: Dictionary, mask_index: int, max_positions: int,
               validation: bool) -> SplitData:
    path = Path(cfg.task.data) / f"{split}.{cfg.task.source_ext}"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: unit file of split {split!r} not found (task.data={cfg.task.data}; "
                                "`python -m repro.tools tokenize` writes it)")
    dataset = MaskedUnitDataset(path, dictionary, mask_index, masking_config(cfg.task), max_positions,
                                skip_too_long=bool(cfg.dataset.skip_invalid_size_inputs_valid_test))
    return SplitData(split, dataset, make_batches(dataset, cfg, int(cfg.common.seed), validation))


def masked_lm_step(model: torch.nn.Module, batch: dict, pad: int) -> tuple[torch.Tensor, dict[str, float]]:
    """fairseq's masked_lm criterion: project only the predicted positions (all when a batch has none)."""
    target = batch["target"]  # (B, T)
    masked = target.ne(pad)
    if not masked.any():
        logits = model(batch["net_input"]["src_tokens"])  # (B, T, V)
        loss, logs = masked_lm_loss(logits.reshape(-1, logits.size(-1)), target.reshape(-1), pad)
    else:
        loss, logs = masked_lm_loss(model(batch["net_input"]["src_tokens"], masked_tokens=masked), target[masked], pad)
    logs["ntokens"] = float(batch["ntokens"])
    logs["nsentences"] = float(batch["nsentences"])
    return loss, logs


def masked_lm_hooks(cfg: DictConfig, model_cfg: Any, dictionary: Dictionary) -> TaskHooks:
    pad = dictionary.pad

    def compute_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return masked_lm_step(model, batch, pad)

    def valid_batch(model: torch.nn.Module, batch: dict) -> dict[str, float]:
        return masked_lm_step(model, batch, pad)[1]

    return TaskHooks(
        kind=KIND, compute_loss=compute_loss, reduce_train=reduce_masked_lm, valid_batch=valid_batch,
        reduce_valid=reduce_masked_lm, model_cfg=dataclasses.asdict(model_cfg), task_cfg=plain(cfg.task),
        dictionary=list(dictionary.symbols), find_unused_parameters=model_cfg.encoder_layerdrop > 0,
    )


def build(cfg: DictConfig, resume: dict[str, Any] | None) -> TaskSetup:
    """Unit dictionary (+ `<mask>`), RobertaModel (random; a resumed run's weights come via the trainer), data."""
    dictionary_path = Path(cfg.task.data) / DICTIONARY_NAME
    dictionary, mask_index = load_unit_dictionary(dictionary_path)
    if resume is not None and resume["dictionary"] != list(dictionary.symbols):
        raise ValueError(f"the run directory's checkpoint was trained with another dictionary than {dictionary_path}")
    model_cfg = model_config(resume["model_cfg"] if resume is not None else cfg.model)
    if model_cfg._name != "roberta":
        raise ValueError(f"task masked_lm trains model._name=roberta, got {model_cfg._name!r}")
    model = RobertaModel(model_cfg, len(dictionary))
    # fairseq: a sample holds at most tokens_per_sample tokens and the model max_positions
    max_positions = min(int(cfg.task.tokens_per_sample), model_cfg.max_positions)
    train = unit_split(cfg, cfg.dataset.train_subset, dictionary, mask_index, max_positions, validation=False)
    valid = [unit_split(cfg, split, dictionary, mask_index, max_positions, validation=True)
             for split in valid_splits(cfg)]
    return TaskSetup(model, masked_lm_hooks(cfg, model_cfg, dictionary), train, valid)
