"""What every training task hands the generic trainer, and the data plumbing tasks share.

`TaskHooks` are the task-specific parts of the update loop (loss, logged metrics, what the
checkpoint records); `SplitData` is one split's dataset with its fixed batches; `TaskSetup` is
everything a task's `build` returns. The audio helpers read fairseq manifests (`<split>.tsv`) and
group utterances into fairseq's length-sorted max-tokens batches.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from repro.config import ModelConfig
from repro.data.batching import batch_by_size, ordered_indices
from repro.data.dataset import FileAudioDataset
from repro.losses.metrics import LN2, in_bits, with_counts  # noqa: F401  (LN2: re-exported)

log = logging.getLogger(__name__)


@dataclass
class TaskHooks:
    """The task-specific parts of training; everything else in the loop is shared."""

    kind: str
    """Checkpoint kind (repro.checkpoints.format.KINDS): 'wav2vec2', 'wav2vec_ctc', ..."""
    compute_loss: Callable[[nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]
    """(model, batch) -> (summed loss, logs with at least loss and sample_size)."""
    reduce_train: Callable[[dict[str, float]], dict[str, float]]
    """Summed logs of one or more updates -> fairseq metrics (loss in bits, accuracy, ...)."""
    valid_batch: Callable[[nn.Module, dict], dict[str, float]] | None = None
    """(eval model, batch) -> summable counts."""
    reduce_valid: Callable[[dict[str, float]], dict[str, float]] | None = None
    """Summed counts over the validation set -> metrics (loss, wer, uer, ...)."""
    model_cfg: dict[str, Any] = field(default_factory=dict)
    """Architecture stored in the checkpoint (what rebuilds the model)."""
    task_cfg: dict[str, Any] = field(default_factory=dict)
    """The task config stored in the checkpoint."""
    dictionary: list[str] | None = None
    """Output symbols stored in the checkpoint (fine-tuning), None otherwise."""
    find_unused_parameters: bool = True
    """DDP must look for parameters without gradients (LayerDrop, a frozen encoder or feature extractor)."""


@dataclass
class SplitData:
    """A dataset and its fixed list of batches (arrays of dataset indices)."""

    name: str
    dataset: Any
    """Has `__getitem__(i) -> sample`, `collater(samples, rng) -> batch` and `sizes` (samples per item)."""
    batches: list[np.ndarray]


@dataclass
class TaskSetup:
    """What a task's `build(cfg, resume)` returns: the trainer's inputs."""

    model: nn.Module
    hooks: TaskHooks
    train: SplitData
    valid: list[SplitData]


# --- config helpers -----------------------------------------------------------------------------


def model_config(node: Any, schema: type = ModelConfig) -> Any:
    """A `schema` dataclass (ModelConfig or a subclass) from a config node (DictConfig, dict or dataclass)."""
    if isinstance(node, schema):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    elif dataclasses.is_dataclass(node):
        node = dataclasses.asdict(node)
    known = {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise ValueError(f"model config has keys unknown to {schema.__name__}: {unknown}")
    return schema(**node)


def plain(node: Any) -> dict[str, Any]:
    """A plain dict from a DictConfig, a dataclass or a mapping (what checkpoints store)."""
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    return dict(node)


def reduce_contrastive(totals: dict[str, float]) -> dict[str, float]:
    """fairseq's wav2vec criterion reduce_metrics (wav2vec 2.0, wav2vec, vq-wav2vec): losses in bits per
    sample_size unit (masked frame / positive), accuracy (§2)."""
    sample_size = totals.get("sample_size", 0.0)
    metrics = {"loss": in_bits(totals.get("loss", 0.0), sample_size)}
    for key in ("loss_0", "loss_1", "loss_2"):
        if key in totals:
            metrics[key] = in_bits(totals[key], sample_size)
    return with_counts(metrics, totals)


# --- audio data ---------------------------------------------------------------------------------


def make_batches(dataset: FileAudioDataset, cfg: DictConfig, seed: int, validation: bool) -> list[np.ndarray]:
    """fairseq's batches: length-sorted (random tie-breaks), grouped under dataset.max_tokens (§4.1)."""
    sizes = dataset.num_tokens_vec()
    order = ordered_indices(sizes, None, np.random.default_rng(seed))
    max_tokens = cfg.dataset.max_tokens
    if max_tokens:
        too_long = sizes[order] > max_tokens
        if too_long.any():
            first = int(order[int(np.argmax(too_long))])
            where = f"{dataset.manifest_path}:{dataset.manifest_line_numbers[first]}"
            if validation and cfg.dataset.skip_invalid_size_inputs_valid_test:
                log.warning("%d utterances of %s longer than max_tokens=%d skipped (first: %s)",
                            int(too_long.sum()), dataset.manifest_path, max_tokens, where)
                order = order[~too_long]
            else:
                raise ValueError(
                    f"{where}: {int(sizes[first])} samples > dataset.max_tokens={max_tokens} "
                    f"({int(too_long.sum())} such utterances); raise max_tokens, set task.max_sample_size"
                    + (", or dataset.skip_invalid_size_inputs_valid_test=true" if validation else "")
                )
    return batch_by_size(sizes, max_tokens, cfg.dataset.batch_size, cfg.dataset.required_batch_size_multiple,
                         indices=order)


def manifest_path(cfg: DictConfig, split: str) -> Path:
    # an absolute split name is a path of its own (self-training's combined split in the run directory)
    path = Path(cfg.task.data) / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest of split {split!r} not found (task.data={cfg.task.data})")
    return path


def valid_splits(cfg: DictConfig) -> list[str]:
    if cfg.dataset.disable_validation or not cfg.dataset.valid_subset:
        return []
    return [split.strip() for split in str(cfg.dataset.valid_subset).split(",") if split.strip()]


def audio_split(cfg: DictConfig, split: str, seed: int, validation: bool) -> SplitData:
    """Unlabeled audio of `<task.data>/<split>.tsv`, cropped to task.max_sample_size (pretraining)."""
    task = cfg.task
    dataset = FileAudioDataset(
        manifest_path(cfg, split), sample_rate=task.sample_rate, max_sample_size=task.max_sample_size,
        min_sample_size=task.min_sample_size or 0, pad=task.enable_padding, normalize=task.normalize,
    )
    return SplitData(split, dataset, make_batches(dataset, cfg, seed, validation))


def audio_splits(cfg: DictConfig) -> tuple[SplitData, list[SplitData]]:
    """The training split and every validation split of an unlabeled-audio task."""
    seed = int(cfg.common.seed)
    train = audio_split(cfg, cfg.dataset.train_subset, seed, validation=False)
    return train, [audio_split(cfg, split, seed, validation=True) for split in valid_splits(cfg)]
