"""wav2vec 2.0 contrastive criterion (fairseq's `wav2vec` criterion with infonce, fairseq_spec.md §2)."""

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

    losses = [loss.detach()]
    if loss_weights is not None:
        extras = extra_losses(net_output)
        weights = list(loss_weights)
        if len(weights) == 1 and len(extras) != 1:
            weights = weights * len(extras)
        if len(weights) != len(extras):
            raise ValueError(
                f"criterion.loss_weights has {len(weights)} entries for {len(extras)} extra losses"
            )
        for value, coef in zip(extras, weights):
            if coef != 0 and value is not None:
                term = coef * value.float() * sample_size
                loss = loss + term
                losses.append(term.detach())

    logs: dict[str, float] = {
        "loss": float(loss.detach()),
        "ntokens": float(sample_size),
        "nsentences": float(batch),
        "sample_size": float(sample_size),
    }
    if len(losses) > 1:
        for index, value in enumerate(losses):
            logs[f"loss_{index}"] = float(value)
    for key in ("prob_perplexity", "code_perplexity", "temp"):
        if key in net_output:
            value = net_output[key]
            logs[key] = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    with torch.no_grad():
        if logits.numel() == 0:
            correct, count = 0, 0
        else:
            # A row whose max and min are both at 0 is constant: not counted as correct.
            is_max = logits.argmax(-1) == 0
            is_min = logits.argmin(-1) == 0
            correct = int(is_max.sum()) - int((is_max & is_min).sum())
            count = is_max.numel()
    logs["correct"] = float(correct)
    logs["count"] = float(count)
    return loss, logs
