"""N-best rescoring of a lexicon beam's hypotheses with a Transformer word LM.

Xu et al. 2021 label the unlabeled audio with the 4-gram lexicon beam, keep its 50 best hypotheses and
rescore them with the Transformer LM trained on the LibriSpeech LM corpus (arXiv 2010.11430 v1, §2.2 and
§3, as paraphrased by maelfabien's review of v1; the full text was not readable here). Each hypothesis
keeps the beam's acoustic and n-gram scores (flashlight reports them apart: total = acoustic +
lm_weight * n-gram + word_score * words, checked in the tests) and gains the Transformer LM's
log-probability of the whole sentence:

    combined = acoustic + ngram_weight * ngram + lm_weight * log P_transformer(words </s>) + word_score * words

Hypotheses that spell the same words through other alignments count once (the best alignment), so the
n-best list is a list of distinct transcriptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from repro.decode.lexicon import load_transformer_lm
from repro.decode.viterbi import Hypothesis


class RescoreError(ValueError):
    """A hypothesis cannot be rescored (it lacks the beam's separate acoustic / n-gram scores)."""


@dataclass(frozen=True)
class RescoreWeights:
    """How the rescored total weighs its parts."""

    ngram_weight: float
    """Weight of the beam's n-gram LM score (log10, as KenLM reports it)."""
    lm_weight: float
    """Weight of the Transformer LM's natural-log sentence probability."""
    word_score: float
    """Score added per word."""


class TransformerSentenceScorer:
    """log P(w_1 .. w_n </s> | </s>) of word sequences under a fairseq `transformer_lm` checkpoint.

    Words are looked up upper-cased (fairseq's README upper-cases the LM vocabulary for the LibriSpeech
    lexicon); a word the LM does not know scores as `<unk>`, so one out-of-vocabulary word lowers a
    hypothesis instead of removing it from the list.
    """

    def __init__(self, lm_path: str | Path, device: str | torch.device = "cpu") -> None:
        self.model, self.dictionary, self.word_index = load_transformer_lm(lm_path, device=device)
        self.model.eval()
        self.device = torch.device(device)

    def token_ids(self, words: Sequence[str]) -> list[int]:
        return [self.word_index.get(word.upper(), self.dictionary.unk) for word in words]

    @torch.no_grad()
    def sentence_log_probs(self, sentences: Sequence[Sequence[str]]) -> list[float]:
        """One forward over the right-padded batch (causal attention: padding after a sentence cannot change it)."""
        if not sentences:
            return []
        eos, pad = self.dictionary.eos, self.dictionary.pad
        targets = [self.token_ids(words) + [eos] for words in sentences]
        width = max(len(target) for target in targets)
        inputs = torch.full((len(targets), width), pad, dtype=torch.long)
        for row, target in enumerate(targets):
            inputs[row, : len(target)] = torch.tensor([eos] + target[:-1])
        log_probs = self.model(inputs.to(self.device)).float().cpu()  # (sentences, width, vocabulary)
        return [float(log_probs[row, torch.arange(len(target)), torch.tensor(target)].sum())
                for row, target in enumerate(targets)]


def distinct_transcriptions(hypotheses: Sequence[Hypothesis], limit: int) -> list[Hypothesis]:
    """The first `limit` hypotheses with distinct word sequences, best beam score first."""
    seen: set[tuple[str, ...]] = set()
    kept: list[Hypothesis] = []
    for hypothesis in sorted(hypotheses, key=lambda h: -h.score):
        key = tuple(hypothesis.words or ())
        if key not in seen:
            seen.add(key)
            kept.append(hypothesis)
        if len(kept) == limit:
            break
    return kept


def combined_score(hypothesis: Hypothesis, transformer_log_prob: float, weights: RescoreWeights) -> float:
    if hypothesis.am_score is None or hypothesis.lm_score is None:
        raise RescoreError("n-best rescoring needs the lexicon beam's acoustic and n-gram scores of each hypothesis")
    return (hypothesis.am_score + weights.ngram_weight * hypothesis.lm_score
            + weights.lm_weight * transformer_log_prob + weights.word_score * len(hypothesis.words or ()))


def rescore(hypotheses: Sequence[Hypothesis], scorer: TransformerSentenceScorer, weights: RescoreWeights,
            nbest: int) -> tuple[Hypothesis, float]:
    """The hypothesis with the best combined score among the `nbest` distinct ones, and that score.

    Ties keep the beam's order (the earlier hypothesis wins)."""
    candidates = distinct_transcriptions(hypotheses, nbest)
    if not candidates:
        raise RescoreError("the beam returned no hypothesis to rescore")
    log_probs = scorer.sentence_log_probs([candidate.words or [] for candidate in candidates])
    scores = [combined_score(candidate, log_prob, weights) for candidate, log_prob in zip(candidates, log_probs)]
    best = max(range(len(candidates)), key=lambda index: (scores[index], -index))
    return candidates[best], scores[best]
