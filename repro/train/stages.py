"""The `pretrain` and `finetune` stages: build data, model and loss from the config, then train.

pretrain  (task audio_pretraining): `<task.data>/<train_subset>.tsv` -> Wav2Vec2Model -> contrastive loss;
          validation loss on `<valid_subset>.tsv`.
finetune  (task audio_finetuning):  manifests + `<split>.ltr` labels + `dict.ltr.txt` -> Wav2Vec2CTC
          (from `model.w2v_path`, ours or fairseq's, or random with `model.no_pretrained_weights`)
          -> CTC loss; validation loss, greedy `wer` / `uer` as fairseq's ctc criterion (§3.2).

Both resume from `<run_dir>/checkpoints/checkpoint_last.pt` (or the newest good interval file) and
leave `checkpoint_best.pt` / `checkpoint_last.pt` in the format the decoder loads.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from repro.checkpoints.fairseq import load as load_pretrained
from repro.config import ModelConfig
from repro.data.batching import batch_by_size, ordered_indices
from repro.data.dataset import FileAudioDataset, load_labels
from repro.data.dictionary import Dictionary
from repro.decode.viterbi import lengths_from_padding_mask, viterbi_decode
from repro.decode.wer import edit_distance, post_process
from repro.losses.contrastive import contrastive_loss
from repro.losses.ctc import ctc_loss
from repro.models.ctc import Wav2Vec2CTC
from repro.models.wav2vec2 import Wav2Vec2Model
from repro.train.checkpoint import CheckpointManager
from repro.train.distributed import DistributedContext, init_distributed
from repro.train.trainer import LN2, SplitData, TaskHooks, Trainer

log = logging.getLogger(__name__)


# --- config helpers -----------------------------------------------------------------------------


def model_config(node: Any) -> ModelConfig:
    """A ModelConfig dataclass from a config node (DictConfig, dict or ModelConfig)."""
    if isinstance(node, ModelConfig):
        return node
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise ValueError(f"model config has unknown keys {unknown}")
    return ModelConfig(**node)


def plain(node: Any) -> dict[str, Any]:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    return dict(node)


# --- data ---------------------------------------------------------------------------------------


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
    path = Path(cfg.task.data) / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest of split {split!r} not found (task.data={cfg.task.data})")
    return path


def valid_splits(cfg: DictConfig) -> list[str]:
    if cfg.dataset.disable_validation or not cfg.dataset.valid_subset:
        return []
    return [split.strip() for split in str(cfg.dataset.valid_subset).split(",") if split.strip()]


def audio_split(cfg: DictConfig, split: str, seed: int, validation: bool) -> SplitData:
    task = cfg.task
    dataset = FileAudioDataset(
        manifest_path(cfg, split), sample_rate=task.sample_rate, max_sample_size=task.max_sample_size,
        min_sample_size=task.min_sample_size or 0, pad=task.enable_padding, normalize=task.normalize,
    )
    return SplitData(split, dataset, make_batches(dataset, cfg, seed, validation))


def labeled_split(cfg: DictConfig, split: str, dictionary: Dictionary, seed: int, validation: bool) -> SplitData:
    task = cfg.task
    manifest = manifest_path(cfg, split)
    unlabeled = FileAudioDataset(manifest, sample_rate=task.sample_rate, min_sample_size=task.min_sample_size or 0)
    label_file = Path(task.data) / f"{split}.{task.labels}"
    labels = load_labels(label_file, dictionary, unlabeled.skipped_indices, unlabeled.manifest_rows, manifest)
    dataset = FileAudioDataset(
        manifest, sample_rate=task.sample_rate, max_sample_size=task.max_sample_size,
        min_sample_size=task.min_sample_size or 0, pad=True, normalize=task.normalize, labels=labels,
        pad_index=dictionary.pad,
    )
    return SplitData(split, dataset, make_batches(dataset, cfg, seed, validation))


# --- pretraining --------------------------------------------------------------------------------


def reduce_contrastive(totals: dict[str, float]) -> dict[str, float]:
    """fairseq's wav2vec criterion reduce_metrics: losses in bits per masked frame, accuracy (§2)."""
    sample_size = totals.get("sample_size", 0.0) or 1.0
    metrics = {"loss": totals.get("loss", 0.0) / sample_size / LN2}
    for key in ("loss_0", "loss_1", "loss_2"):
        if key in totals:
            metrics[key] = totals[key] / sample_size / LN2
    if totals.get("count"):
        metrics["accuracy"] = totals["correct"] / totals["count"]
    for key in ("ntokens", "nsentences", "sample_size"):
        if key in totals:
            metrics[key] = totals[key]
    return metrics


def pretraining_hooks(cfg: DictConfig, model_cfg: ModelConfig) -> TaskHooks:
    loss_weights = list(cfg.criterion.loss_weights) if cfg.criterion.loss_weights is not None else None
    if not cfg.criterion.infonce:
        raise ValueError("criterion.infonce=false (binary cross-entropy) is wav2vec v1's loss, not wav2vec 2.0's")

    def compute_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        net_output = model(**batch["net_input"])
        return contrastive_loss(net_output, loss_weights)

    def valid_batch(model: torch.nn.Module, batch: dict) -> dict[str, float]:
        return compute_loss(model, batch)[1]

    stored_cfg = dataclasses.asdict(model_cfg)
    stored_cfg["normalize"] = bool(cfg.task.normalize)  # fine-tuning checks it against its own (§3.1)
    return TaskHooks(
        kind="wav2vec2", compute_loss=compute_loss, reduce_train=reduce_contrastive, valid_batch=valid_batch,
        reduce_valid=reduce_contrastive, model_cfg=stored_cfg, task_cfg=plain(cfg.task), dictionary=None,
        find_unused_parameters=model_cfg.encoder_layerdrop > 0 or model_cfg.feature_grad_mult == 0,
    )


def run_pretrain(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Stage `pretrain`: wav2vec 2.0 contrastive pretraining (resumes from the run directory)."""
    if cfg.task._name != "audio_pretraining":
        raise ValueError(f"stage pretrain needs task._name=audio_pretraining, got {cfg.task._name!r}")
    context = _init(cfg)
    try:
        seed = int(cfg.common.seed)
        torch.manual_seed(seed)  # the initial weights
        model_cfg = model_config(cfg.model)
        model = Wav2Vec2Model(model_cfg)
        train = audio_split(cfg, cfg.dataset.train_subset, seed, validation=False)
        valid = [audio_split(cfg, split, seed, validation=True) for split in valid_splits(cfg)]
        trainer = Trainer(cfg, model, pretraining_hooks(cfg, model_cfg), train, valid, Path(run_dir), tracker,
                          context)
        _announce(trainer, "pretrain", train)
        metrics = trainer.fit()
        return {"num_updates": trainer.num_updates, "valid": metrics, "best": trainer.best_metric}
    finally:
        context.shutdown()


# --- fine-tuning --------------------------------------------------------------------------------


def greedy_errors(logits: torch.Tensor, frame_padding_mask: torch.Tensor | None, target: torch.Tensor,
                  dictionary: Dictionary, post_process_mode: str, blank: int = 0) -> dict[str, float]:
    """Greedy CTC decoding and fairseq's validation counts (§3.2): unit errors over token ids incl. '|',
    word errors after post-processing; summed, so the rates are corpus level."""
    logits = logits.float().cpu()
    lengths = lengths_from_padding_mask(frame_padding_mask, logits.size(0), logits.size(1))
    hypotheses = viterbi_decode(logits, lengths, blank)
    target = target.cpu()
    counts = {"c_errors": 0.0, "c_total": 0.0, "w_errors": 0.0, "w_total": 0.0}
    for row, hypothesis in enumerate(hypotheses):
        predicted = hypothesis.tokens
        keep = (target[row] != dictionary.pad) & (target[row] != dictionary.eos)
        reference = target[row][keep].tolist()
        counts["c_errors"] += edit_distance(reference, predicted)
        counts["c_total"] += len(reference)
        reference_words = post_process(dictionary.string(reference), post_process_mode).split()
        predicted_words = post_process(dictionary.string(predicted), post_process_mode).split()
        counts["w_errors"] += edit_distance(reference_words, predicted_words)
        counts["w_total"] += len(reference_words)
    return counts


def reduce_ctc(totals: dict[str, float]) -> dict[str, float]:
    sample_size = totals.get("sample_size", 0.0) or 1.0
    ntokens = totals.get("ntokens", 0.0) or 1.0
    metrics = {"loss": totals.get("loss", 0.0) / sample_size / LN2}
    if sample_size != ntokens:
        metrics["nll_loss"] = totals.get("loss", 0.0) / ntokens / LN2
    for key in ("ntokens", "nsentences", "sample_size"):
        if key in totals:
            metrics[key] = totals[key]
    if "c_total" in totals:
        metrics["uer"] = 100.0 * totals["c_errors"] / max(totals["c_total"], 1.0)
        metrics["wer"] = 100.0 * totals["w_errors"] / max(totals["w_total"], 1.0)
        metrics["raw_wer"] = metrics["wer"]  # greedy: no LM decoder during validation
    return metrics


def finetuning_hooks(cfg: DictConfig, model_cfg: ModelConfig, dictionary: Dictionary) -> TaskHooks:
    sentence_avg = bool(cfg.optimization.sentence_avg)
    zero_infinity = bool(cfg.criterion.zero_infinity)
    mode = str(cfg.criterion.post_process)

    def compute_loss(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        logits, frame_padding = model(**batch["net_input"])
        return ctc_loss(logits, frame_padding, batch["target"], batch["target_lengths"], blank=dictionary.bos,
                        pad=dictionary.pad, eos=dictionary.eos, zero_infinity=zero_infinity,
                        sentence_avg=sentence_avg)

    def valid_batch(model: torch.nn.Module, batch: dict) -> dict[str, float]:
        logits, frame_padding = model(**batch["net_input"])
        _, logs = ctc_loss(logits, frame_padding, batch["target"], batch["target_lengths"], blank=dictionary.bos,
                           pad=dictionary.pad, eos=dictionary.eos, zero_infinity=zero_infinity,
                           sentence_avg=sentence_avg)
        logs.update(greedy_errors(logits, frame_padding, batch["target"], dictionary, mode, dictionary.bos))
        return logs

    return TaskHooks(
        kind="wav2vec_ctc", compute_loss=compute_loss, reduce_train=reduce_ctc, valid_batch=valid_batch,
        reduce_valid=reduce_ctc, model_cfg=dataclasses.asdict(model_cfg), task_cfg=plain(cfg.task),
        dictionary=list(dictionary.symbols),
        find_unused_parameters=(model_cfg.encoder_layerdrop > 0 or model_cfg.feature_grad_mult == 0
                                or model_cfg.freeze_finetune_updates > 0),
    )


def build_ctc_model(cfg: DictConfig, vocab_size: int, resume_model_cfg: dict[str, Any] | None) -> Wav2Vec2CTC:
    """The CTC model: the resumed run's architecture, the pretrained checkpoint's, or random weights."""
    finetune_cfg = model_config(cfg.model)
    if resume_model_cfg is not None:  # weights come from the trainer checkpoint
        return Wav2Vec2CTC(model_config(resume_model_cfg), vocab_size)
    if finetune_cfg.w2v_path:
        loaded = load_pretrained(finetune_cfg.w2v_path)
        if loaded.kind != "wav2vec2":
            raise ValueError(f"model.w2v_path={finetune_cfg.w2v_path} holds a {loaded.kind!r} model; fine-tuning "
                             "starts from a pretrained wav2vec2 model")
        pretrained = None if finetune_cfg.no_pretrained_weights else loaded.model
        return Wav2Vec2CTC.from_pretrained(pretrained, loaded.model_cfg, finetune_cfg, vocab_size)
    if not finetune_cfg.no_pretrained_weights:
        raise ValueError("stage finetune needs model.w2v_path (a pretrained checkpoint) or "
                         "model.no_pretrained_weights=true (random initialization)")
    # no pretrained model at all: the architecture is the one given in `model`
    architecture = dataclasses.replace(finetune_cfg, _name="wav2vec2", normalize=bool(cfg.task.normalize))
    return Wav2Vec2CTC.from_pretrained(None, architecture, finetune_cfg, vocab_size)


def run_finetune(cfg: DictConfig, run_dir: Path, tracker: Any = None) -> dict[str, Any]:
    """Stage `finetune`: CTC fine-tuning with validation WER (resumes from the run directory)."""
    if cfg.task._name != "audio_finetuning":
        raise ValueError(f"stage finetune needs task._name=audio_finetuning, got {cfg.task._name!r}")
    if not cfg.task.labels:
        raise ValueError("stage finetune needs task.labels (e.g. 'ltr')")
    context = _init(cfg)
    try:
        seed = int(cfg.common.seed)
        dictionary_path = Path(cfg.task.data) / f"dict.{cfg.task.labels}.txt"
        dictionary = Dictionary.load(dictionary_path)
        save_dir = Path(run_dir) / cfg.checkpoint.save_dir
        resume = CheckpointManager(save_dir).load_latest(expected_kind="wav2vec_ctc")
        if resume is not None and resume[0]["dictionary"] != list(dictionary.symbols):
            raise ValueError(f"{resume[1]} was trained with another dictionary than {dictionary_path}")
        torch.manual_seed(seed)  # the CTC projection (and the encoder when random)
        model = build_ctc_model(cfg, len(dictionary), resume[0]["model_cfg"] if resume else None)
        merged_cfg = model_config(model.cfg)
        if merged_cfg.normalize is not None and bool(merged_cfg.normalize) != bool(cfg.task.normalize):
            raise ValueError(f"task.normalize={cfg.task.normalize} but the pretrained model used "
                             f"normalize={merged_cfg.normalize} (fairseq requires them equal)")
        train = labeled_split(cfg, cfg.dataset.train_subset, dictionary, seed, validation=False)
        valid = [labeled_split(cfg, split, dictionary, seed, validation=True) for split in valid_splits(cfg)]
        trainer = Trainer(cfg, model, finetuning_hooks(cfg, merged_cfg, dictionary), train, valid, Path(run_dir),
                          tracker, context)
        _announce(trainer, "finetune", train)
        metrics = trainer.fit(preloaded=resume)
        return {"num_updates": trainer.num_updates, "valid": metrics, "best": trainer.best_metric}
    finally:
        context.shutdown()


# --- shared -------------------------------------------------------------------------------------


def _init(cfg: DictConfig) -> DistributedContext:
    return init_distributed(
        cpu=bool(cfg.common.cpu), backend=cfg.distributed_training.distributed_backend,
        expected_world_size=int(cfg.distributed_training.distributed_world_size),
    )


def _announce(trainer: Trainer, stage: str, train: SplitData) -> None:
    if not trainer.context.is_master:
        return
    parameters = sum(p.numel() for p in trainer.model.parameters())
    hours = float(train.dataset.sizes.sum()) / float(trainer.cfg.task.sample_rate) / 3600
    print(
        f"repro {stage}: {parameters / 1e6:.2f}M parameters, {len(train.dataset)} utterances ({hours:.2f} h), "
        f"{len(train.batches)} batches/epoch, world {trainer.context.world_size} x update_freq "
        f"{trainer.update_freq}, device {trainer.device}, max_update {trainer.cfg.optimization.max_update}",
        file=sys.stderr, flush=True,
    )
