"""Greedy CTC decoding (fairseq `--w2l-decoder viterbi`, fairseq_spec.md §7.2).

With zero transitions flashlight's Viterbi path is the per-frame argmax, so greedy decoding is:
argmax per frame, collapse repeats, drop the blank (`<s>` = 0). Word boundaries (`|`) stay in the
unit sequence; `repro.decode.wer.units_to_words` turns them into spaces.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Hypothesis:
    """One decoding result for one utterance."""

    tokens: list[int]
    """Unit ids after collapsing repeats and dropping blanks (word boundaries `|` kept)."""
    score: float = 0.0
    """Decoder score (Viterbi: sum over frames of the best log-probability)."""
    words: list[str] | None = None
    """Words chosen by a lexicon decoder; None for unit-level decoders (words come from the units)."""
    timesteps: list[int] = field(default_factory=list)
    """Frame of each token, when the decoder reports it."""
    am_score: float | None = None
    """Lexicon beam: the acoustic part of `score` (score = am_score + lm_weight * lm_score + word_score * words)."""
    lm_score: float | None = None
    """Lexicon beam: the unweighted LM part of `score`."""


def collapse_ctc(frame_ids: Iterable[int], blank: int = 0) -> list[int]:
    """Merge runs of the same id, then remove blanks: [a a - a b b] -> [a a b]."""
    collapsed: list[int] = []
    previous: int | None = None
    for token in frame_ids:
        token = int(token)
        if token != previous and token != blank:
            collapsed.append(token)
        previous = token
    return collapsed


def frame_lengths(emissions: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None) -> list[int]:
    """Valid frames per utterance; all T frames when `lengths` is None."""
    batch, frames = emissions.shape[:2]
    if lengths is None:
        return [frames] * batch
    values = [int(n) for n in (lengths.tolist() if torch.is_tensor(lengths) else lengths)]
    if len(values) != batch:
        raise ValueError(f"{len(values)} lengths for a batch of {batch} emissions")
    if any(n < 0 or n > frames for n in values):
        raise ValueError(f"lengths {values} outside [0, {frames}]")
    return values


def lengths_from_padding_mask(padding_mask: torch.Tensor | None, batch: int, frames: int) -> torch.Tensor:
    """(B,) valid frame counts from a (B, T) bool mask (True = padding)."""
    if padding_mask is None:
        return torch.full((batch,), frames, dtype=torch.long)
    return (~padding_mask).sum(-1).long().cpu()


def viterbi_decode(
    emissions: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None, blank: int = 0
) -> list[Hypothesis]:
    """Greedy decoding of a batch.

    emissions: (B, T, V) logits or log-probabilities (the argmax is the same);
    lengths: (B,) valid frames per utterance (None = all T).
    The score is the sum of the per-frame max log-softmax, as fairseq's new viterbi decoder reports.
    """
    if emissions.dim() != 3:
        raise ValueError(f"emissions must be (batch, frames, vocab), got shape {tuple(emissions.shape)}")
    valid = frame_lengths(emissions, lengths)
    log_probs = emissions.float().log_softmax(-1)
    best_scores, best_ids = log_probs.max(-1)  # (B, T) each
    hypotheses = []
    for row, length in enumerate(valid):
        tokens = collapse_ctc(best_ids[row, :length].tolist(), blank)
        hypotheses.append(Hypothesis(tokens=tokens, score=float(best_scores[row, :length].sum())))
    return hypotheses


class ViterbiDecoder:
    """Decoder interface shared with the lexicon beam: `decode(emissions, lengths) -> n-best lists`."""

    def __init__(self, blank: int = 0) -> None:
        self.blank = blank

    def decode(
        self, emissions: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None
    ) -> list[list[Hypothesis]]:
        return [[hypothesis] for hypothesis in viterbi_decode(emissions, lengths, self.blank)]
