"""The training stages, wired: pick the task module (repro.tasks), build it, hand it to the Trainer.

pretrain  runs a pretraining task (wav2vec 2.0 `audio_pretraining` + `wav2vec2`, ...);
finetune  runs a fine-tuning task (`audio_finetuning`: CTC).

Both resume from `<run_dir>/checkpoints/checkpoint_last.pt` (or the newest good interval file) and
leave `checkpoint_best.pt` / `checkpoint_last.pt` in the format the decoder loads. What a task trains
and how is in its module; nothing task-specific lives here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from repro.data.audio_headers import check_split_audio
from repro.data.dataset import FileAudioDataset
from repro.tasks import task_module
from repro.tasks.common import SplitData, model_config  # noqa: F401  (model_config: public helper)
from repro.train.checkpoint import CheckpointManager
from repro.train.distributed import DistributedContext, check_on_master, init_distributed
from repro.train.self_training import retraining_config
from repro.train.trainer import Trainer


def run_training(cfg: DictConfig, run_dir: Path, tracker: Any, stage: str) -> dict[str, Any]:
    """Build the configured task and train it (resuming from the run directory)."""
    task = task_module(cfg)
    if task.STAGE != stage:
        raise ValueError(f"stage {stage} cannot run task._name={cfg.task._name} with model._name="
                         f"{cfg.model._name}: that is a {task.STAGE} task")
    if stage == "finetune" and cfg.self_training.unlabeled_data:  # a self-training row re-trains on pseudo-labels
        cfg = retraining_config(cfg, Path(run_dir))
    context = _init(cfg)
    try:
        resume = CheckpointManager(Path(run_dir) / cfg.checkpoint.save_dir).load_latest(expected_kind=task.KIND)
        torch.manual_seed(int(cfg.common.seed))  # the initial weights
        setup = task.build(cfg, resume[0] if resume else None)
        # a bad audio file is named now, not when its batch comes; by rank 0 alone, the others get its verdict
        check_on_master(lambda: check_audio(setup.train, *setup.valid), context)
        trainer = Trainer(cfg, setup.model, setup.hooks, setup.train, setup.valid, Path(run_dir), tracker, context)
        _announce(trainer, stage, setup.train)
        metrics = trainer.fit(preloaded=resume)
        return {"num_updates": trainer.num_updates, "valid": metrics, "best": trainer.best_metric}
    finally:
        context.shutdown()


def check_audio(*splits: SplitData) -> None:
    """The audio headers of every split that reads audio (unit files of masked_lm / roberta_ctc have none)."""
    for split in splits:
        if isinstance(split.dataset, FileAudioDataset):
            check_split_audio(split.dataset)


def run_pretrain(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Stage `pretrain` (resumes from the run directory)."""
    return run_training(cfg, run_dir, tracker, "pretrain")


def run_finetune(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Stage `finetune` (resumes from the run directory)."""
    return run_training(cfg, run_dir, tracker, "finetune")


def _init(cfg: DictConfig) -> DistributedContext:
    return init_distributed(
        cpu=bool(cfg.common.cpu), backend=cfg.distributed_training.distributed_backend,
        expected_world_size=int(cfg.distributed_training.distributed_world_size),
    )


def _announce(trainer: Trainer, stage: str, train: SplitData) -> None:
    if not trainer.context.is_master:
        return
    parameters = sum(p.numel() for p in trainer.model.parameters())
    # audio: samples at task.sample_rate; units (masked_lm, roberta_ctc): one token per 10 ms frame
    per_second = 100.0 if hasattr(train.dataset, "dictionary") else float(trainer.cfg.task.sample_rate)
    hours = float(train.dataset.sizes.sum()) / per_second / 3600
    print(
        f"repro {stage}: {parameters / 1e6:.2f}M parameters, {len(train.dataset)} utterances ({hours:.2f} h), "
        f"{len(train.batches)} batches/epoch, world {trainer.context.world_size} x update_freq "
        f"{trainer.update_freq}, device {trainer.device}, max_update {trainer.cfg.optimization.max_update}",
        file=sys.stderr, flush=True,
    )
