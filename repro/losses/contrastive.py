"""fairseq's `wav2vec` criterion (fairseq_spec.md §2): InfoNCE for wav2vec 2.0 (`infonce`), binary
cross-entropy for wav2vec and vq-wav2vec (§8.4), each plus the weighted extra losses times sample_size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F


def extra_losses(net_output: dict[str, Any]) -> list[torch.Tensor]:
    """[(G*V - prob_perplexity) / (G*V), features_pen]; the diversity term only with a quantizer (§1.7)."""
    extra = []
    if "prob_perplexity" in net_output:
        num_vars = net_output["num_vars"]
        extra.append((num_vars - net_output["prob_perplexity"]) / num_vars)
    if "features_pen" in net_output:
        extra.append(net_output["features_pen"])
    return extra


def contrastive_loss(
    net_output: dict[str, Any], loss_weights: Sequence[float] | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed InfoNCE over the masked frames plus weighted extra losses times sample_size.

    net_output["x"]: logits (1+K, B, M) with the positive at index 0. Returns the loss sum (not divided by
    sample_size: the trainer divides the gradients by the summed sample_size, §2) and fairseq's logging
    values: loss, loss_0 (CE), loss_1 / loss_2 (weighted extras, when more than one term is active),
    the log keys, correct / count (accuracy), sample_size, ntokens, nsentences.
    """
    logits_tbm = net_output["x"]
    num_candidates, batch = logits_tbm.size(0), logits_tbm.size(1)
    logits = logits_tbm.transpose(0, 2).reshape(-1, num_candidates).float()  # (M*B, 1+K)
    target = torch.zeros(logits.size(0), dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="sum")
    sample_size = target.numel()

    loss, losses = add_weighted_extras(loss, extra_losses(net_output), loss_weights, sample_size)
    with torch.no_grad():
        correct, count = count_correct(logits.transpose(0, 1))
    return loss, criterion_logs(loss, losses, sample_size, batch, net_output, correct, count)


def add_weighted_extras(loss: torch.Tensor, extras: list[torch.Tensor], loss_weights: Sequence[float] | None,
                        sample_size: float) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """loss + sum(coef * extra * sample_size) (only with loss_weights; one weight is broadcast), and the
    detached terms [loss, weighted extras...] for loss_0, loss_1, ... (fairseq criterion l.90-106)."""
    losses = [loss.detach()]
    if loss_weights is None:
        return loss, losses
    weights = list(loss_weights)
    if len(weights) == 1 and len(extras) != 1:
        weights = weights * len(extras)
    if len(weights) != len(extras):
        raise ValueError(f"criterion.loss_weights has {len(weights)} entries for {len(extras)} extra losses")
    for value, coef in zip(extras, weights):
        if coef != 0 and value is not None:
            term = coef * value.float() * sample_size
            loss = loss + term
            losses.append(term.detach())
    return loss, losses


def count_correct(logits: torch.Tensor) -> tuple[int, int]:
    """(#columns whose candidate 0 scores highest, #columns); logits (1+K, N), the positive at 0.

    A column whose max and min are both at 0 is constant: not counted as correct (fairseq's guard).
    """
    if logits.numel() == 0:
        return 0, 0
    is_max = logits.argmax(0) == 0
    is_min = logits.argmin(0) == 0
    return int(is_max.sum()) - int((is_max & is_min).sum()), is_max.numel()


LOGGED_OUTPUTS = ("prob_perplexity", "code_perplexity", "temp", "kmeans_loss")
"""Model outputs copied into the logs (averaged over logging outputs by the trainer)."""


def criterion_logs(loss: torch.Tensor, losses: list[torch.Tensor], sample_size: float, nsentences: int,
                   net_output: dict[str, Any], correct: int, count: int) -> dict[str, float]:
    """fairseq's logging output: loss, ntokens = sample_size, nsentences, sample_size, loss_i (when more
    than one term), the model's logged outputs, and correct / count for the accuracy."""
    logs: dict[str, float] = {
        "loss": float(loss.detach()),
        "ntokens": float(sample_size),
        "nsentences": float(nsentences),
        "sample_size": float(sample_size),
    }
    if len(losses) > 1:
        for index, value in enumerate(losses):
            logs[f"loss_{index}"] = float(value)
    for key in LOGGED_OUTPUTS:
        if key in net_output:
            value = net_output[key]
            logs[key] = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    logs["correct"] = float(correct)
    logs["count"] = float(count)
    return logs


# --- wav2vec / vq-wav2vec -------------------------------------------------------------------------


def wav2vec_extra_losses(net_output: dict[str, Any]) -> list[torch.Tensor]:
    """wav2vec.py get_extra_losses: [G*V - prob_perplexity] (Gumbel; not divided by G*V, unlike wav2vec
    2.0) or [kmeans_loss] (k-means), or [] without a quantizer."""
    if "prob_perplexity" in net_output:
        return [net_output["num_vars"] - net_output["prob_perplexity"]]
    if "kmeans_loss" in net_output:
        return [net_output["kmeans_loss"]]
    return []


def binary_contrastive_loss(net_output: dict[str, Any], loss_weights: Sequence[float] | None,
                            balanced_classes: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE-with-logits summed over every score (criterion l.67-70): label 1 for the positives, 0 for the
    negatives; `balanced_classes` weights negatives 1/K. sample_size = number of positives =
    B x sum over steps of (T - shift). Extra losses (with loss_weights) are wav2vec.py's (§8.5).

    net_output["cpc_logits"]: per step (1+K, B, T - shift), the positive at index 0. fairseq logs no
    accuracy for BCE; ours (`correct` / `count`) is the share of predictions whose positive outscores all
    K negatives (chance 1 / (1+K)).
    """
    steps = net_output["cpc_logits"]
    loss = torch.zeros((), device=steps[0].device) if steps else torch.zeros(())
    sample_size, correct, count = 0, 0, 0
    for scores in steps:
        scores = scores.float()
        labels = torch.zeros_like(scores)
        labels[0] = 1.0
        weights = None
        if balanced_classes:
            weights = torch.full_like(scores, 1.0 / (scores.size(0) - 1))
            weights[0] = 1.0
        loss = loss + F.binary_cross_entropy_with_logits(scores, labels, weights, reduction="sum")
        sample_size += scores[0].numel()
        with torch.no_grad():
            step_correct, step_count = count_correct(scores.reshape(scores.size(0), -1))
        correct, count = correct + step_correct, count + step_count
    loss, losses = add_weighted_extras(loss, wav2vec_extra_losses(net_output), loss_weights, sample_size)
    batch = steps[0].size(1) if steps else 0
    return loss, criterion_logs(loss, losses, sample_size, batch, net_output, correct, count)
