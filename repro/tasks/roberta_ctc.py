"""CTC fine-tuning of RoBERTa on discrete units (task `audio_finetuning`, model `roberta_ctc`; arXiv 1911.03912).

Data: `<task.data>/<split>.<task.source_ext>` units (encoded with the pretrained model's dict.txt) and
`<split>.<task.labels>` letter targets line by line (else `<split>.lbl`, the tokenizer's copy of them),
`dict.<labels>.txt` (tokenize copies it beside the units). Model: RobertaCTC from the
RoBERTa of `model.w2v_path` (fairseq's bert_kmeans or ours), from the resumed run, or random with
`model.no_pretrained_weights` (units from `<task.data>/dict.txt`; the paper's "no BERT" ablation).
Loss and validation metrics: the CTC task's (repro.tasks.ctc_finetuning).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from repro.checkpoints.fairseq import load as load_pretrained
from repro.config import ModelConfig
from repro.data.dataset import load_labels
from repro.data.dictionary import Dictionary
from repro.data.units import MASK_SYMBOL, LabeledUnitDataset, load_unit_dictionary, unit_labels_path
from repro.models.ctc import merge_finetune_config
from repro.models.roberta import RobertaCTC
from repro.tasks.common import SplitData, TaskSetup, make_batches, model_config, valid_splits
from repro.tasks.ctc_finetuning import finetuning_hooks

KIND = "roberta_ctc"
STAGE = "finetune"


def labeled_unit_split(cfg: DictConfig, split: str, units: Dictionary, letters: Dictionary, max_positions: int,
                       validation: bool) -> SplitData:
    data = Path(cfg.task.data)
    source = data / f"{split}.{cfg.task.source_ext}"
    if not source.is_file():
        raise FileNotFoundError(f"{source}: unit file of split {split!r} not found (task.data={cfg.task.data})")
    line_count = sum(1 for _ in source.open(encoding="utf-8"))
    labels = load_labels(unit_labels_path(data, split, cfg.task.labels), letters, set(), line_count, source)
    dataset = LabeledUnitDataset(source, units, labels, letters.pad, max_positions,
                                 skip_too_long=validation and bool(cfg.dataset.skip_invalid_size_inputs_valid_test))
    return SplitData(split, dataset, make_batches(dataset, cfg, int(cfg.common.seed), validation))


def pretrained_roberta(cfg: DictConfig) -> tuple[Any, ModelConfig, Dictionary]:
    """(RoBERTa model or None, its architecture, its unit dictionary) for a fresh fine-tuning run."""
    finetune_cfg = model_config(cfg.model)
    if finetune_cfg.w2v_path:
        loaded = load_pretrained(finetune_cfg.w2v_path)
        if loaded.kind != "roberta":
            raise ValueError(f"model.w2v_path={finetune_cfg.w2v_path} holds a {loaded.kind!r} model; model "
                             "roberta_ctc fine-tunes a RoBERTa units model (bert_kmeans or a masked_lm run)")
        if loaded.dictionary is None:
            raise ValueError(f"model.w2v_path={finetune_cfg.w2v_path}: no dict.txt beside the checkpoint")
        model = None if finetune_cfg.no_pretrained_weights else loaded.model
        return model, loaded.model_cfg, loaded.dictionary
    if not finetune_cfg.no_pretrained_weights:
        raise ValueError("model roberta_ctc needs model.w2v_path (a RoBERTa checkpoint) or "
                         "model.no_pretrained_weights=true")
    units, _ = load_unit_dictionary(Path(cfg.task.data) / "dict.txt")
    return None, dataclasses.replace(finetune_cfg, _name="roberta"), units


def build(cfg: DictConfig, resume: dict[str, Any] | None) -> TaskSetup:
    if not cfg.task.labels:
        raise ValueError("stage finetune needs task.labels (e.g. 'ltr')")
    letters_path = Path(cfg.task.data) / f"dict.{cfg.task.labels}.txt"
    letters = Dictionary.load(letters_path)
    if resume is not None:
        if resume["dictionary"] != list(letters.symbols):
            raise ValueError(f"the run directory's checkpoint was trained with another dictionary than {letters_path}")
        merged = model_config(resume["model_cfg"])
        units = Dictionary.from_symbols(resume["task_cfg"]["unit_symbols"][4:])
        pretrained = None
    else:
        pretrained, architecture, units = pretrained_roberta(cfg)
        merged = dataclasses.replace(merge_finetune_config(architecture, model_config(cfg.model)), _name=KIND)
    mask_index = units.index(MASK_SYMBOL) if MASK_SYMBOL in units else None
    model = RobertaCTC.from_pretrained(pretrained, merged, len(units), len(letters), mask_index)
    train = labeled_unit_split(cfg, cfg.dataset.train_subset, units, letters, merged.max_positions, False)
    valid = [labeled_unit_split(cfg, split, units, letters, merged.max_positions, True) for split in valid_splits(cfg)]
    hooks = finetuning_hooks(cfg, merged, letters)
    task_cfg = {**hooks.task_cfg, "unit_symbols": list(units.symbols)}  # what rebuilds the input side
    hooks = dataclasses.replace(hooks, kind=KIND, task_cfg=task_cfg,
                                find_unused_parameters=merged.layerdrop > 0 or merged.freeze_finetune_updates > 0)
    return TaskSetup(model, hooks, train, valid)
