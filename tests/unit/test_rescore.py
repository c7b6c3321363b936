"""N-best rescoring with a Transformer LM (Xu et al. v1 §2.2): the 4-gram beam's hypotheses, a tiny random
LM in fairseq's checkpoint format, and an independent computation of the combined score."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_transformer_lm import WORDS, fairseq_state_dict, reference_log_probs, write_lm  # noqa: E402

from repro.data.dictionary import Dictionary  # noqa: E402
from repro.decode.lexicon import LexiconBeamDecoder  # noqa: E402
from repro.decode.rescore import RescoreError, RescoreWeights, TransformerSentenceScorer, rescore  # noqa: E402
from repro.decode.viterbi import Hypothesis  # noqa: E402

LETTERS = Dictionary.from_symbols(["|", *sorted({letter for word in WORDS for letter in word.upper()})])
NGRAM_WEIGHT, WORD_SCORE = 1.2, 0.4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rescore")
    lexicon = root / "lexicon.txt"
    lexicon.write_text("".join(f"{word.upper()}\t{' '.join(word.upper())} |\n" for word in WORDS))
    text = root / "text.txt"
    sentences = random.Random(0)
    text.write_text("".join(" ".join(sentences.choice(WORDS).upper() for _ in range(sentences.randint(2, 6))) + "\n"
                            for _ in range(300)))
    arpa = root / "2-gram.arpa"
    subprocess.run([str(Path(sys.executable).parent / "lmplz"), "-o", "2", "-S", "50M", "-T", str(root),
                    "--discount_fallback", "--text", str(text), "--arpa", str(arpa)], check=True, capture_output=True)
    vocab = 4 + len(WORDS)
    state = fairseq_state_dict(vocab, torch.Generator().manual_seed(1))
    lm_path = write_lm(root / "transformer", state)
    decoder = LexiconBeamDecoder(LETTERS, lexicon, "kenlm", arpa, lm_weight=NGRAM_WEIGHT, word_score=WORD_SCORE,
                                 beam=100, nbest=100)
    return decoder, lm_path, state, vocab


def nbest_lists(decoder: LexiconBeamDecoder, count: int) -> list[list[Hypothesis]]:
    generator = torch.Generator().manual_seed(7)
    return [decoder.decode(torch.randn(1, 40, len(LETTERS), generator=generator) * 1.5)[0] for _ in range(count)]


def reference_choice(hypotheses, state, vocab, weights: RescoreWeights, nbest: int) -> tuple[list[str], float]:
    """Best distinct transcription by acoustic + weighted 4-gram + weighted Transformer LM + word score,
    the LM log-probability summed from the raw checkpoint tensors one sentence at a time."""
    lm_dictionary = WORDS  # dict.txt order after the 4 specials
    best_words, best_score, seen = None, float("-inf"), set()
    for hypothesis in sorted(hypotheses, key=lambda h: -h.score):
        words = tuple(hypothesis.words)
        if words in seen:
            continue
        seen.add(words)
        if len(seen) > nbest:
            break
        targets = [4 + lm_dictionary.index(word.lower()) for word in words] + [2]  # </s> = 2
        log_probs = reference_log_probs(state, [2] + targets[:-1], vocab)
        transformer = sum(float(log_probs[t, target]) for t, target in enumerate(targets))
        total = (hypothesis.am_score + weights.ngram_weight * hypothesis.lm_score + weights.lm_weight * transformer
                 + weights.word_score * len(words))
        if total > best_score:
            best_words, best_score = list(words), total
    return best_words, best_score


def test_beam_scores_split_into_acoustic_and_ngram_parts(models):
    decoder = models[0]
    for hypotheses in nbest_lists(decoder, 3):
        for hypothesis in hypotheses:
            assert hypothesis.score == pytest.approx(
                hypothesis.am_score + NGRAM_WEIGHT * hypothesis.lm_score + WORD_SCORE * len(hypothesis.words), abs=1e-3)


def test_rescoring_picks_the_best_combined_score_and_can_overturn_the_beam(models):
    decoder, lm_path, state, vocab = models
    scorer = TransformerSentenceScorer(lm_path)
    weights = RescoreWeights(ngram_weight=NGRAM_WEIGHT, lm_weight=2.5, word_score=-0.3)
    overturned = 0
    for hypotheses in nbest_lists(decoder, 8):
        assert len({tuple(h.words) for h in hypotheses}) > 3  # a real choice
        chosen, score = rescore(hypotheses, scorer, weights, nbest=10)
        expected_words, expected_score = reference_choice(hypotheses, state, vocab, weights, nbest=10)
        assert chosen.words == expected_words
        assert score == pytest.approx(expected_score, abs=1e-3)
        overturned += chosen.words != hypotheses[0].words
    assert overturned > 0, "rescoring never changed the beam's best: the Transformer LM had no effect"
    # with no Transformer LM weight and the beam's own weights, rescoring keeps the beam's best
    neutral = RescoreWeights(ngram_weight=NGRAM_WEIGHT, lm_weight=0.0, word_score=WORD_SCORE)
    for hypotheses in nbest_lists(decoder, 3):
        chosen, score = rescore(hypotheses, scorer, neutral, nbest=10)
        assert chosen.words == hypotheses[0].words and score == pytest.approx(hypotheses[0].score, abs=1e-3)


def test_a_hypothesis_without_separate_scores_cannot_be_rescored(models):
    scorer = TransformerSentenceScorer(models[1])
    with pytest.raises(RescoreError, match="acoustic and n-gram scores"):
        rescore([Hypothesis(tokens=[5], score=1.0, words=["THE"])], scorer, RescoreWeights(1, 1, 0), nbest=5)
