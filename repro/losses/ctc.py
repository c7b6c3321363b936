"""CTC criterion (fairseq's `ctc` criterion, fairseq_spec.md §3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ctc_loss(
    logits: torch.Tensor,
    frame_padding_mask: torch.Tensor | None,
    target: torch.Tensor,
    target_lengths: torch.Tensor,
    blank: int = 0,
    pad: int = 1,
    eos: int = 2,
    zero_infinity: bool = True,
    sentence_avg: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed CTC loss of raw logits (B, T, V) against padded targets (B, S).

    log_softmax in fp32, blank 0, pad and eos removed from the targets, input lengths from the frame
    padding mask; sample_size = B if sentence_avg else ntokens (the trainer divides by it).
    """
    batch, frames, _ = logits.shape
    lprobs = F.log_softmax(logits.float(), dim=-1).transpose(0, 1).contiguous()  # (T, B, V)
    if frame_padding_mask is not None:
        input_lengths = (~frame_padding_mask).long().sum(-1)
    else:
        input_lengths = torch.full((batch,), frames, dtype=torch.long, device=logits.device)
    keep = (target != pad) & (target != eos)
    targets_flat = target[keep]
    label_lengths = keep.long().sum(-1)  # fairseq recomputes the lengths from the kept tokens
    with torch.backends.cudnn.flags(enabled=False):
        loss = F.ctc_loss(
            lprobs,
            targets_flat,
            input_lengths,
            label_lengths,
            blank=blank,
            reduction="sum",
            zero_infinity=zero_infinity,
        )
    ntokens = int(target_lengths.sum()) if target_lengths is not None else int(label_lengths.sum())
    sample_size = batch if sentence_avg else ntokens
    logs = {
        "loss": float(loss.detach()),
        "ntokens": float(ntokens),
        "nsentences": float(batch),
        "sample_size": float(sample_size),
    }
    return loss, logs
