"""Masked-LM criterion (fairseq's `masked_lm` criterion) and its logged metrics."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from repro.losses.metrics import in_bits, with_counts


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, pad: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed cross-entropy of the predicted positions: logits (N, V), targets (N,) original tokens.

    log_softmax in fp32 as fairseq; `pad` targets are ignored (they only occur when a batch has no
    masked position and the caller projects every position, fairseq's fallback). sample_size is the
    number of predicted tokens, so the trainer's normalised loss is nats per masked token.
    """
    lprobs = F.log_softmax(logits.float(), dim=-1)  # (N, V)
    loss = F.nll_loss(lprobs, targets, reduction="sum", ignore_index=pad)
    counted = targets.ne(pad)
    correct = (lprobs.argmax(-1).eq(targets) & counted).sum()
    count = int(counted.sum())
    return loss, {"loss": float(loss.detach()), "sample_size": float(count), "correct": float(correct),
                  "count": float(count)}


def reduce_masked_lm(totals: dict[str, float]) -> dict[str, float]:
    """fairseq's reduce_metrics: loss in bits per predicted token, ppl = 2**loss; plus MLM accuracy."""
    loss = in_bits(totals.get("loss", 0.0), totals.get("sample_size", 0.0))
    return with_counts({"loss": loss, "ppl": 2.0 ** min(loss, 1000.0)}, totals)
