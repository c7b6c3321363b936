"""CTC fine-tuning (task `audio_finetuning`, model `wav2vec_ctc`, criterion `ctc`).

Data: manifests + `<split>.<task.labels>` labels + `dict.<labels>.txt`; model: Wav2Vec2CTC from
`model.w2v_path` (ours or fairseq's), from the resumed run's architecture, or random with
`model.no_pretrained_weights`; loss: CTC; validation: loss plus greedy `wer` / `uer` as fairseq's
ctc criterion (§3.2).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from repro.checkpoints.fairseq import load as load_pretrained
from repro.config import ModelConfig
from repro.data.dataset import FileAudioDataset, load_labels
from repro.data.dictionary import Dictionary
from repro.decode.viterbi import lengths_from_padding_mask, viterbi_decode
from repro.decode.wer import edit_distance, post_process
from repro.losses.ctc import ctc_loss
from repro.losses.metrics import in_bits, with_counts
from repro.models.ctc import Wav2Vec2CTC
from repro.tasks.common import (
    SplitData,
    TaskHooks,
    TaskSetup,
    make_batches,
    manifest_path,
    model_config,
    plain,
    valid_splits,
)

KIND = "wav2vec_ctc"
STAGE = "finetune"


# --- data ---------------------------------------------------------------------------------------


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


# --- loss and metrics ---------------------------------------------------------------------------


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
    metrics = {"loss": in_bits(totals.get("loss", 0.0), sample_size)}
    if sample_size != ntokens:
        metrics["nll_loss"] = in_bits(totals.get("loss", 0.0), ntokens)
    with_counts(metrics, totals)
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
        kind=KIND, compute_loss=compute_loss, reduce_train=reduce_ctc, valid_batch=valid_batch,
        reduce_valid=reduce_ctc, model_cfg=dataclasses.asdict(model_cfg), task_cfg=plain(cfg.task),
        dictionary=list(dictionary.symbols),
        find_unused_parameters=(model_cfg.encoder_layerdrop > 0 or model_cfg.feature_grad_mult == 0
                                or model_cfg.freeze_finetune_updates > 0),
    )


# --- model --------------------------------------------------------------------------------------


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


def build(cfg: DictConfig, resume: dict[str, Any] | None) -> TaskSetup:
    """Dictionary, model (resumed architecture, pretrained weights or random), hooks and labeled data."""
    if not cfg.task.labels:
        raise ValueError("stage finetune needs task.labels (e.g. 'ltr')")
    seed = int(cfg.common.seed)
    dictionary_path = Path(cfg.task.data) / f"dict.{cfg.task.labels}.txt"
    dictionary = Dictionary.load(dictionary_path)
    if resume is not None and resume["dictionary"] != list(dictionary.symbols):
        raise ValueError(f"the run directory's checkpoint was trained with another dictionary than {dictionary_path}")
    model = build_ctc_model(cfg, len(dictionary), resume["model_cfg"] if resume else None)
    merged_cfg = model_config(model.cfg)
    if merged_cfg.normalize is not None and bool(merged_cfg.normalize) != bool(cfg.task.normalize):
        raise ValueError(f"task.normalize={cfg.task.normalize} but the pretrained model used "
                         f"normalize={merged_cfg.normalize} (fairseq requires them equal)")
    train = labeled_split(cfg, cfg.dataset.train_subset, dictionary, seed, validation=False)
    valid = [labeled_split(cfg, split, dictionary, seed, validation=True) for split in valid_splits(cfg)]
    return TaskSetup(model, finetuning_hooks(cfg, merged_cfg, dictionary), train, valid)
